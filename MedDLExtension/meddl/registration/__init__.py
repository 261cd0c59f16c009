"""Learned deformable registration: a diffeomorphic network plus test-time optimisation, with DeepSim.

    from meddl.registration import register, RegistrationConfig
    result = register(fixed, moving, RegistrationConfig(similarity="mi"))
    result.warped, result.displacement, result.jacobian, result.inverse, result.summary

Stages: affine pre-alignment (:mod:`.affine`), a U-Net predicting a stationary velocity field
integrated by scaling and squaring (:mod:`.network`, :mod:`.svf`; trained contrast-agnostic on
synthetic pairs, :mod:`.synth`, :mod:`.train`), then Adam instance optimisation of the velocity
(:mod:`.optimise`) with local NCC, mutual information, MIND-SSC or DeepSim (:mod:`.similarity`).
"""

from .affine import AffineMode
from .pipeline import Method, RegistrationConfig, RegistrationResult, register
from .similarity import Similarity

__all__ = ["register", "RegistrationConfig", "RegistrationResult", "Method", "Similarity", "AffineMode"]
