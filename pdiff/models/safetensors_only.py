"""Loading that never unpickles: every pdiff model reads safetensors or nothing.

diffusers' `ModelMixin.from_pretrained` falls back to pickled `.bin` weights when `use_safetensors` is
not given, and `DiffusionPipeline.from_pretrained` never gives it. Each component of a pdiff generator
is a class with this mixin, so whichever loader reaches it, a folder without safetensors is an error
and a planted pickle is never read.
"""

from __future__ import annotations


class SafetensorsOnly:
    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        if kwargs.get("use_safetensors") is False:
            raise ValueError(f"{cls.__name__} loads safetensors only (use_safetensors=False would unpickle weights)")
        kwargs["use_safetensors"] = True
        return super().from_pretrained(*args, **kwargs)
