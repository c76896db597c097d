"""MLC-NC training, evaluation, prediction and data inspection (the same as the `mlcnc` command).

python run.py --config=configs/default.py --workdir=workdir/default
python run.py --config=configs/coco_lt.py --config.data.root=/data/coco --workdir=...
python run.py --config=configs/default.py --workdir=... --mode=predict --config.predict.inputs=img.jpg
"""

from mlcnc_jax import cli

if __name__ == "__main__":
    cli.main()
