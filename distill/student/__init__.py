"""SigLino student: release-compatible model, image processor, packing planner, MoE balancing.

    from distill.student import Student, StudentConfig, StudentOutput, ImageProcessor, plan_packing, \
        load_official_checkpoint, update_expert_bias
"""
from .config import MoEArgs, StudentConfig, get_config, known_configs, released_configs
from .model import Student, StudentOutput, load_official_checkpoint
from .moe import update_expert_bias
from .packing import PackingPlan, plan_packing
from .processor import ImageProcessor, smart_resize

__all__ = ["Student", "StudentConfig", "StudentOutput", "MoEArgs", "ImageProcessor", "smart_resize",
           "PackingPlan", "plan_packing", "load_official_checkpoint", "update_expert_bias", "get_config",
           "known_configs", "released_configs"]
