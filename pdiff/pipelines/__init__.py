"""`PDiffPipeline`: sample parameter vectors from a trained generator, as a diffusers pipeline."""

from .loading import InvalidGeneratorError
from .pipeline_pdiff import SAMPLERS, PDiffPipeline, PDiffPipelineOutput, sampler_scheduler


def register_with_diffusers() -> None:
    """Make `diffusers.DiffusionPipeline.from_pretrained(folder)` find `PDiffPipeline`.

    diffusers looks the `_class_name` of model_index.json up in its own namespace; putting our class
    there avoids `custom_pipeline` / `trust_remote_code`, which would run code from the repository.
    """
    import diffusers

    setattr(diffusers, "PDiffPipeline", PDiffPipeline)


# Importing the pipeline registers it: the one explicit side effect of `from pdiff import PDiffPipeline`.
register_with_diffusers()

__all__ = ["SAMPLERS", "InvalidGeneratorError", "PDiffPipeline", "PDiffPipelineOutput", "register_with_diffusers", "sampler_scheduler"]
