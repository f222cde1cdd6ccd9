"""Socket types the pack's nodes pass between them."""
CFMModelType = "CFM_MODEL"
CFMSolverType = "CFM_SOLVER"
