"""specdec as a transformers `custom_generate` repository: copy this folder's parent to the Hub (or
point at it locally) and call

    model.generate(ids, custom_generate="<repo or folder>", trust_remote_code=True,
                   proposer=specdec.Ngram(), max_new_tokens=64)

transformers hands every `generate` argument to `generate` below; specdec decodes with the given
proposer (none: plain decoding through its engine) and returns what `specdec.generate` returns.
"""

import specdec


def generate(model, inputs=None, generation_config=None, streamer=None, **kwargs):
    proposer = kwargs.pop("proposer", None)
    attention_mask = kwargs.pop("attention_mask", None)
    input_ids = kwargs.pop("input_ids", inputs)
    unused_args = (
        "prefix_allowed_tokens_fn", "synced_gpus", "negative_prompt_ids", "negative_prompt_attention_mask",
        "use_model_defaults",
    )  # fmt: skip
    for unused in unused_args:
        value = kwargs.pop(unused, None)
        if value:
            raise ValueError(f"specdec's custom_generate does not take {unused}; use model.generate alone")
    # the user's own logits processors and stopping criteria: applied per tree node / per token
    return specdec.generate(
        model, input_ids, attention_mask, proposer=proposer, generation_config=generation_config, streamer=streamer,
        logits_processor=kwargs.pop("logits_processor", None), stopping_criteria=kwargs.pop("stopping_criteria", None),
        **kwargs,
    )  # fmt: skip
