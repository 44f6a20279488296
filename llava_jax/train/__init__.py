"""Fine-tuning LLaVA in JAX: LLaVA-format data and labels as the original training code builds them (stage 1
`pretrain`, stage 2 `finetune`), the loss and gradients, optax AdamW, Orbax train-state checkpoints."""
