"""pneumoflag model toolchain: train, convert (int8 TFLite, Edge TPU), evaluate."""
