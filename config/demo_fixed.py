# The fixed-depth baseline for the demo: the same parameters and positions, one pass of the core block, no
# random depth, and about the same wall-clock budget as config/demo.py (its steps are cheaper, so it takes more).
# python train.py config/demo.py config/demo_fixed.py
out_dir = "out-demo-fixed"
mean_recurrence = 1
backprop_depth = 1
random_depth = False
max_iters = 24000
lr_decay_iters = 24000
warmup_iters = 720
