"""labutils — the importable half of the Wanda pruning lab. Notebooks use it as ``import labutils as lu``.

Data flows one way: config → model + tokenizer → calibration batches → for each decoder layer: capture
inputs → accumulate statistics → score → mask → apply → run the pruned layer → evaluate.
"""
from .errors import BadInput, LabError
from .config import DEFAULT_PROFILE, PROFILES, Profile, get_profile
from .device import (cuda_capability, device_summary, get_device, require_cuda, semi_structured_support, set_seed,
                     synchronize)
from .models import (embedded_gguf_path, embedded_model_dir, find_decoder_layers, find_linears, load_model,
                     load_pretrained, random_model, tiny_llama_config)
from .data import calibration_data, corpus_path, corpus_split, split_tokens, test_tokens
from .calibration import (HessianAccumulator, InputNormAccumulator, LayerInputs, capture_layer_inputs,
                          collect_input_norms, collect_statistics, run_layer)
from .masks import SparsityTarget, apply_mask, nm_mask, parse_nm, prune_by_score, select_mask, unstructured_mask
from .methods import (REGISTRY, Method, get_method, magnitude_score, output_error, ria_score, sparsegpt_weights,
                      wanda_score)
from .owl import OwlConfig, layer_outlier_ratios, owl_sparsities
from .pruning import METHODS, PruneReport, calibration_stages, prune_model
from .sparsity import mask_sha256, model_sparsity, nm_violations, prunable_linears, sparsity_table
from .evaluation import perplexity
from .checkpoint import check_output_dir, is_lab_output, load_pruned, load_report, save_pruned
from .pipeline import PruneJob, build_report, default_output_dir, run_prune_job, summary_table
from .compare import Comparison, Variant, compare_methods, standard_variants, write_results
from .checks import (check_close, check_layer_sparsity, check_ria_score, check_wanda_score, data_sources,
                     model_summary, versions, versions_table)
from .plots import (outlier_summary, plot_input_norms, plot_layer_sparsity, plot_method_comparison,
                    plot_perplexity)

__all__ = [name for name in dir() if not name.startswith("_")]
