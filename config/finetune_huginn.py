# Fine-tune the released Huginn-0125 on your text with the randomized-depth objective (as the release's own
# fine-tuning example does: every step draws its depth, gradients through the last 8 iterations), one GPU:
# python prepare_data.py --input=notes.txt --tokenizer=huginn --huginn_dir=huginn-0125
# python train.py config/finetune_huginn.py --huginn_dir=huginn-0125 --dataset=notes_huginn
# Several GPUs or nodes, sharded: torchrun --standalone --nproc_per_node=8 train.py config/finetune_huginn.py --fsdp ...
init_from = "huginn"
out_dir = "out-finetune"
batch_size = 4
block_size = 128
gradient_accumulation_steps = 8      # 32 sequences of 128 tokens per step, over all GPUs
backprop_depth = 8
activation_checkpointing = True
learning_rate = 5e-7                 # the release's example: AdamW, no weight decay, betas (0.9, 0.95)
min_lr = 5e-10
weight_decay = 0.0
grad_clip = 0.0
max_iters = 1000
warmup_iters = 100
lr_decay_iters = 1000
eval_interval = 100
eval_iters = 20
