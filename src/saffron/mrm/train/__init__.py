"""Training an MRM on a reward corpus (``saffron train-mrm``): ``common.py`` the data checks and the supervision
every kind shares, ``lora.py`` the paper's LoRA MRM, ``head.py`` the head MRM and the head PRM."""
