"""DeepZero's sparsity: ZO-GraSP pruning-at-init scores from loss queries, the layer-wise pruning ratios they
imply (or Smart Ratio / uniform ratios, data-free), and random per-layer coordinate masks for Sparse-CGE."""
from .masks import dense_masks, density_masks, mask_coordinate_count, sample_masks, with_dense_coordinates
from .ratios import (kept_counts, load_ratios, overall_sparsity, ratios_from_scores, save_ratios, smart_ratios,
                     uniform_ratios)
from .zo_grasp import (DIRECTION_CONVENTIONS, class_balanced_probe, fo_grasp_scores, fo_hessian_gradient_product,
                       prunable_layers, prunable_parameters, zo_grasp_scores, zo_hessian_gradient_product)

__all__ = ["DIRECTION_CONVENTIONS", "class_balanced_probe", "dense_masks", "density_masks", "fo_grasp_scores",
           "fo_hessian_gradient_product", "kept_counts", "load_ratios", "mask_coordinate_count", "overall_sparsity",
           "prunable_layers", "prunable_parameters", "ratios_from_scores", "sample_masks", "save_ratios",
           "smart_ratios", "uniform_ratios", "with_dense_coordinates", "zo_grasp_scores",
           "zo_hessian_gradient_product"]
