"""Small configs shared by the tests."""
from moe_asr.model.config import DecoderConfig, EncoderConfig, ModelConfig
from moe_asr.moe.config import MoEConfig


def tiny_config(num_experts: int = 4, top_k: int = 2, causal: bool = True, input_layer: str = "conv2d",
                cnn_module_norm: str = "layer_norm", **model_kw) -> ModelConfig:
    return ModelConfig(
        vocab_size=model_kw.pop("vocab_size", 12), input_dim=20,
        encoder=EncoderConfig(output_size=32, attention_heads=4, linear_units=48, num_blocks=2,
                              causal=causal, input_layer=input_layer, cnn_module_kernel=5,
                              cnn_module_norm=cnn_module_norm),
        decoder=DecoderConfig(attention_heads=4, linear_units=48, num_blocks=2, r_num_blocks=1),
        moe=MoEConfig(num_experts=num_experts, top_k=top_k), **model_kw)
