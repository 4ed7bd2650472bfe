"""tvkd-ray: Teacher Value-based Knowledge Distillation (DPO + teacher potential shaping) on Ray."""
