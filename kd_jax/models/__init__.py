"""Flax model zoo. Every model maps `x [B, H, W, C]` (`tokens [B, T]` for the LM) to a
`ModelOutput`."""
from kd_jax.models.apply import count_params, init_model, make_apply_fn
from kd_jax.models.output import ModelOutput
# --- zoo exports (owned by the model-zoo work) ---
from kd_jax.models.convnet import ConvNet
from kd_jax.models.digits_cnn import DigitsCNN
from kd_jax.models.mlp import MLP
from kd_jax.models.mobilenetv2 import MobileNetV2
from kd_jax.models.registry import create_model, list_models
from kd_jax.models.resnet import CifarResNet
from kd_jax.models.shufflenetv1 import ShuffleNetV1
from kd_jax.models.shufflenetv2 import ShuffleNetV2
from kd_jax.models.transformer_lm import TransformerLM
from kd_jax.models.vgg import VGG
from kd_jax.models.vit import ViT
from kd_jax.models.wrn import WideResNet
# --- end zoo exports ---
