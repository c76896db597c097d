"""The schema of every experiment config: each field with its default value and its meaning.

`default_config()` returns the whole schema as a locked ConfigDict: the default run (MLC-NC
on the built-in `synthetic_lt` data, sized for a 2-core CPU, fine-tuning the shipped trunk;
configs/default.py runs it). Every field any config uses is declared here; the config
files in configs/ start from this one and change values only (the ConfigDict is locked, so
a misspelt key is an error, on the command line too). A new field is declared here, with
its default and a comment that says what it does.
"""

import ml_collections

from mlcnc_jax import trunks  # names the shipped trunk file; imports neither JAX nor TF


def default_config() -> ml_collections.ConfigDict:
    """The default config: every field of the schema with its default value (locked)."""
    c = ml_collections.ConfigDict()
    c.seed = 0
    # Compute dtype of the backbone and head; parameters stay float32.
    c.dtype = "float32"  # 'float32' | 'bfloat16'
    # 'jit': jax.jit over a 1-D 'data' mesh (default); 'pmap': jax.pmap with lax.pmean.
    c.parallel = "jit"

    c.data = ml_collections.ConfigDict()
    # synthetic_lt | voc_lt | coco_lt | coco_json (own COCO-format files) | csv (own CSV files)
    c.data.name = "synthetic_lt"
    # Dataset root: COCO dir (annotations/, train2017/, val2017/) or the VOCdevkit dir
    # (VOC2007/, VOC2012/); for synthetic_lt, where the generated data is kept.
    c.data.root = "~/.cache/mlcnc_jax/datasets"
    # Directory with the long-tailed split files (JSON or the original DB-loss files).
    c.data.split_dir = ""
    c.data.download_splits = False  # fetch missing split files from the public repository
    c.data.image_source = "files"  # 'files' (user's copy) | 'tfds' (tfds-prepared coco/voc)
    c.data.tfds_data_dir = ""  # data_dir of tfds-prepared datasets ('' = tfds default)
    c.data.coco_test_all = False  # COCO val2017: all 5,000 images, or the 4,952 with labels
    # The user's own data (coco_json: annotation + image dir; csv: "path,class names").
    c.data.train_annotations = ""
    c.data.train_images = ""
    c.data.test_annotations = ""
    c.data.test_images = ""
    c.data.skip_corrupt = False  # skip unreadable images (and report them) instead of failing
    c.data.head_min = 100  # head: >= head_min training images
    c.data.tail_max = 20  # tail: < tail_max training images
    # A validation split carved from the training data (fraction of images), used for
    # model selection instead of the test split; 0 disables it.
    c.data.val_fraction = 0.0
    c.data.image_size = 32  # training crop / evaluation crop, pixels
    # Evaluation: resize the shorter side, then centre crop (the benchmarks: 256 / 224). The
    # built-in images hold objects up to their border, so they are not cropped.
    c.data.resize_size = 32
    # Random resized crop: smallest crop area (torchvision and the reference code: 0.08). The
    # built-in images hold several small objects that any scale crop may cut away while the
    # labels still name them (label noise: 30.7 mAP pre-training at 0.25 against 45.3 at 1.0,
    # measured on synthetic_lt 1.1.0), so they are not scale-cropped (flip and colour only).
    c.data.crop_min_area = 1.0
    # Random shift: a random crop of the image zero-padded by this many pixels per side (0:
    # none; the benchmarks' random resized crop already shifts).
    c.data.crop_padding = 3
    c.data.sampling = "class_aware"  # 'class_aware' | 'uniform'
    c.data.mean = (0.466, 0.471, 0.380)
    c.data.std = (0.195, 0.194, 0.192)
    # synthetic_lt generation.
    c.data.synthetic_seed = 0
    c.data.synthetic_classes = "target"  # 'target' (the 20 LT classes) | 'pretrain' (20 others)
    # The 'target' train split: 'planned' (the hand-made long tail) | 'dbloss' (the long-tailed
    # split builder of COCO-LT / VOC-LT over a balanced pool with more objects per image).
    c.data.synthetic_train_split = "planned"
    # csv: what separates class names in the label field (' ' = any whitespace; another
    # character, e.g. ';' or '|', lets class names hold spaces; ',' also takes several fields).
    c.data.label_separator = " "
    # coco_json / csv: a split JSON of `python -m mlcnc_jax.data.lt_builder` choosing the
    # training images ('' = every image of train_annotations).
    c.data.train_split_file = ""

    c.model = ml_collections.ConfigDict()
    c.model.name = "mlcnc"  # 'mlcnc' | 'baseline' (global pooling + linear classifier)
    # resnet_small | resnet_small_s2 (its stride-2 stem: 64 px at 32 px's cost) | resnet18 |
    # resnet34 | resnet50 | resnet101 | vit_* (vit_hybrid_cpu32:
    # resnet_small's first stages, then a transformer) | clip_vit_* |
    # openclip_vit_* (models/vit.py; configs/voc_lt_clip.py) | any registered name
    c.model.backbone = "resnet_small"
    # Backbone weights: a trunk file of this project (the default: the shipped trunk), a
    # torchvision .safetensors/.pth file, a CLIP image encoder (or whole CLIP) state dict for
    # the clip_* / openclip_* backbones (.safetensors, or .pt/.pth with torch), or a workdir of
    # this project; 'none' (or '') trains from scratch.
    c.model.pretrained = trunks.SYNTHETIC_PRETRAIN
    c.model.embed_dim = 128  # D (the paper: 768 for ResNet-50; smaller for the CPU backbone)
    c.model.proj_dim = 20
    c.model.attention = "mha"  # 'mha' (reference code) | 'cosine' (paper text)
    c.model.num_heads = 8
    c.model.attention_dropout = 0.1
    # 'etf' (frozen) | 'etf_trainable' | 'linear' | 'text' (frozen, with the geometry of the
    # class text embeddings in model.text_embeddings instead of the ETF's)
    c.model.classifier = "etf"
    # classifier='text': a .npy file of one text embedding per class, [K, d] float, in the
    # dataset's class order (e.g. CLIP's of 'a photo of a {name}'), or '' to embed the class
    # names (class_prompts).
    c.model.text_embeddings = ""
    # Without text_embeddings: prompt templates ('{}' for the class name; several are
    # averaged) whose embeddings by CLIP's text tower (read from text_weights, '' for
    # model.pretrained) are computed once at start and stored in the workdir.
    c.model.class_prompts = ()
    c.model.text_weights = ""
    # --mode=eval without training: score the test split by the cosine of a CLIP backbone's
    # image embedding with each class's text embedding (docs/clip.md).
    c.model.zero_shot = False
    c.model.alpha = 1.0
    # gamma at the start. The reference code starts at 1, but with unit-norm projections and
    # unit ETF columns the logits then stay within about +-sqrt(K), too little for the two-way
    # loss, and gamma grows only ~lr per step: chosen on a validation split of the training data.
    c.model.logit_scale_init = 16.0
    c.model.etf_seed = 0

    c.loss = ml_collections.ConfigDict()
    # Weights of the loss terms; a term with weight 0 is not computed.
    c.loss.two_way = 1.0
    c.loss.bce = 0.0
    c.loss.focal = 0.0
    c.loss.asl = 0.0
    c.loss.db = 0.0
    c.loss.fla = 0.5
    c.loss.fpc = 0.2
    c.loss.two_way_tp = 4.0
    c.loss.two_way_tn = 1.0
    c.loss.fpc_tau = 0.5
    # Warm-up: the first warmup_epochs train FLA alone with weight warmup_fla.
    c.loss.warmup_epochs = 1
    c.loss.warmup_fla = 1.0
    c.loss.prototypes = "previous_epoch"  # 'previous_epoch' (paper) | 'cumulative' (reference)

    c.train = ml_collections.ConfigDict()
    c.train.batch_size = 64  # global batch, over all hosts and devices
    # 360 steps from the shipped trunk (10 epochs of 36): on a second copy of the benchmark
    # (synthetic_seed=1: its own train and test splits) 400 steps gave raw mAP 71.7 / tail
    # 57.6 against 70.8 / 56.6 at 300 (synthetic_lt 2.1.0); 360 keeps the whole default run
    # under 5 minutes on 2 cores (3 min 57 s idle; 400 steps took 5 min 14 s). On 2.0.0, 600 steps gave
    # 66.5 test mAP (tail 49.5) against 65 (tail 51) at 300; learning rate 3e-3 63.4.
    c.train.num_epochs = 10
    # -1: an epoch of the sampler (class-aware: max_c n_c * K = 8,000 images here); the CPU
    # default uses shorter epochs (they set the prototype updates and the warm-up).
    c.train.steps_per_epoch = 36
    # 'adam' (coupled L2, as torch.optim.Adam(weight_decay=...) and the reference code) |
    # 'adamw' (decoupled decay, as torch.optim.AdamW)
    c.train.optimizer = "adam"
    c.train.learning_rate = 1e-3
    # On weights only (no biases, no 1-D parameters): 'adam' adds it to the gradient (L2),
    # 'adamw' subtracts lr * weight_decay * w from the weights.
    c.train.weight_decay = 1e-4
    # The backbone's learning rate (and AdamW decay) relative to the head's; 0 freezes it.
    c.train.backbone_lr_multiplier = 1.0
    # ViT backbones only (1.0 = off): block i of L gets lr * layer_decay ** (L - i), the
    # patch / class / positional embeddings and ln_pre layer_decay ** (L + 1), ln_post and
    # proj the backbone's lr.
    c.train.layer_decay = 1.0
    c.train.schedule = "one_cycle"  # 'one_cycle' | 'constant'
    c.train.warmup_fraction = 0.2
    c.train.ema_decay = 0.99  # 0.9997 (the recipe) averages over ~3,000 steps: longer than this run
    c.train.log_every_steps = 20
    c.train.eval_every_epochs = 10
    c.train.checkpoint_every_steps = 200
    c.train.keep_checkpoints = 2
    c.train.keep_best = False  # also keep the checkpoint of the best test mAP in checkpoints/
    # Batches placed on the devices ahead of the step that uses them (and steps the host may
    # run ahead of the devices).
    c.train.prefetch_batches = 2

    c.eval = ml_collections.ConfigDict()
    c.eval.batch_size = 128
    # 0: score the whole test split; N: an evenly spaced N of its images (quick checks of a
    # long run, or of a huge test split; the console says so, and such numbers are not results).
    c.eval.max_images = 0

    c.predict = ml_collections.ConfigDict()
    c.predict.threshold = 0.5
    c.predict.inputs = ""  # image files or a folder, comma separated
    c.predict.attention_maps = False

    # The training-recipe switches (configuration/_recipes.py sets them: 'reference' is the
    # authors' code, 'paper' the paper's text; choose one with --config=configs/voc_lt.py:paper).
    c.recipe = "none"  # the recipe a config file applied: 'none' | 'reference' | 'paper'
    # 'flax' (flax defaults; per-class Xavier of W_c) | 'torch' (torch's defaults, as the reference
    # code: default Linear token embedding, MultiheadAttention init, Xavier over W [K, D, p]).
    c.model.param_init = "flax"
    c.train.adam_beta1 = 0.9  # Adam's beta1 when it does not cycle
    # torch OneCycleLR's cycle_momentum: beta1 from beta1_range[1] down to beta1_range[0] while
    # the lr rises, back while it falls (one_cycle schedule only).
    c.train.cycle_beta1 = False
    c.train.beta1_range = (0.85, 0.95)
    c.train.decay_2d_bias = False  # L2 also on the 2-D per-class projection bias (reference code)
    # Step size of the logit scale gamma relative to the lr: Adam moves gamma ~lr per step.
    c.train.logit_scale_lr_multiplier = 1.0
    # --mode=plan: throughput assumed for the GPU-hours estimate (images/s on one accelerator).
    c.plan = ml_collections.ConfigDict()
    c.plan.train_images_per_second = 1000.0
    c.plan.eval_images_per_second = 3000.0

    c.lock()
    return c
