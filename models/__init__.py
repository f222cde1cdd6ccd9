"""Pure torch: the CFM network and its checkpoint formats. No ComfyUI imports here."""
from .checkpoint import CFMCheckpoint, CheckpointError, MethodSettings, convert, load_checkpoint, save_checkpoint
from .unet import CFMUNet, UNetConfig

__all__ = ["CFMCheckpoint", "CheckpointError", "MethodSettings", "convert", "load_checkpoint", "save_checkpoint",
           "CFMUNet", "UNetConfig"]
