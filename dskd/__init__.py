"""dskd: knowledge distillation for text-generation models on DeepSpeed.

Implements word-level (logits) KD, pseudo-target augmentation and Joint-Teaching
(Calderon et al., ACL 2023) with a fused, chunked KD loss and MLflow tracking.
"""

__version__ = "0.1.0"
