"""The training methods: one registry entry each (`registry`), the step that computes a batch's
losses (`steps`), the losses themselves (`losses`), the network (`model`, `pretrained`) and the
fused mixup op (`mixup_kernels`)."""
