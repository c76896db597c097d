"""Pre-training of the CPU backbone on the balanced 'pretrain' classes of synthetic_lt.

The stand-in for ImageNet pre-training: 20 classes (letters and shapes, never the
digits or shapes of the target benchmark), 10,000 balanced, mostly object-centric
training images (1-3 objects). The plain model (backbone, global pooling, linear
classifier) learns them with BCE and uniform sampling. Its EMA weights ship as the
built-in trunk (mlcnc_jax/trunks/), which configs/default.py fine-tunes from:

    python run.py --config=configs/pretrain.py --workdir=workdir/pretrain
    python -m mlcnc_jax.trunks --workdir=workdir/pretrain \
        --output=mlcnc_jax/trunks/synthetic_pretrain_resnet_small_32.safetensors

Fine-tuning runs can also take a workdir of this config directly, with
--config.model.pretrained=<workdir>.
"""

from configs import default


def get_config():
    c = default.get_config()
    c.data.synthetic_classes = "pretrain"
    c.data.sampling = "uniform"
    # The benchmark's image size: the fine-tuning runs must use the same one.
    c.data.image_size = 32
    c.data.resize_size = 32
    c.data.crop_min_area = 1.0
    c.data.crop_padding = 0  # as the shipped trunk was made
    c.model.name = "baseline"
    c.model.backbone = "resnet_small"
    c.model.pretrained = ""  # from scratch: this run makes the trunk
    c.loss.two_way = 0.0
    c.loss.fla = 0.0
    c.loss.fpc = 0.0
    c.loss.bce = 1.0
    c.loss.warmup_epochs = 0
    c.train.batch_size = 64
    c.train.steps_per_epoch = -1  # uniform epoch: 10,000 images = 157 steps of 64
    c.train.num_epochs = 10  # 1,570 steps
    c.train.learning_rate = 3e-3
    c.train.ema_decay = 0.99
    c.train.eval_every_epochs = 10
    c.train.log_every_steps = 50
    c.train.checkpoint_every_steps = 500
    c.train.keep_checkpoints = 1
    return c
