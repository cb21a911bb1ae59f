"""labutils — the importable half of the Wanda pruning lab. Notebooks use it as ``import labutils as lu``.

Data flows one way: config → model + tokenizer → calibration batches → for each decoder layer: capture
inputs → accumulate input norms → score → mask → apply → run the pruned layer → evaluate.
"""
from .calibration import InputNormAccumulator, LayerInputs, capture_layer_inputs, collect_input_norms, run_layer
from .checkpoint import check_output_dir, is_lab_output, load_pruned, load_report, save_pruned
from .checks import (check_close, check_layer_sparsity, check_wanda_score, data_sources, model_summary, versions,
                     versions_table)
from .config import DEFAULT_PROFILE, PROFILES, Profile, get_profile
from .data import calibration_data, corpus_path, corpus_split, split_tokens, test_tokens
from .device import cuda_capability, device_summary, get_device, require_cuda, set_seed, semi_structured_support
from .errors import BadInput, LabError
from .evaluation import perplexity
from .models import (embedded_gguf_path, embedded_model_dir, find_decoder_layers, find_linears, load_model,
                     load_pretrained, random_model, tiny_llama_config)
from .plots import outlier_summary, plot_input_norms, plot_perplexity
from .pipeline import PruneJob, build_report, default_output_dir, run_prune_job, summary_table
from .pruning import (METHODS, PruneReport, SparsityTarget, apply_mask, magnitude_score, nm_mask, parse_nm,
                      prune_model, select_mask, unstructured_mask, wanda_score)
from .sparsity import mask_sha256, model_sparsity, nm_violations, prunable_linears, sparsity_table

__all__ = [name for name in dir() if not name.startswith("_")]
