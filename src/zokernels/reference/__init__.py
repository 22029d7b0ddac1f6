"""Slow, obviously-correct twins of every fast path; tests compare against these."""
from .estimators_ref import cge_ref, rge_ref
from .oracle import OracleError, OracleResult, cge_oracle
from .philox_ref import philox4x32_10_ref, philox_normal_ref, philox_uint32_ref

__all__ = ["cge_ref", "rge_ref", "cge_oracle", "OracleError", "OracleResult", "philox4x32_10_ref", "philox_normal_ref",
           "philox_uint32_ref"]
