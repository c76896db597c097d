"""Datasets, long-tailed splits and the tf.data input pipeline."""
