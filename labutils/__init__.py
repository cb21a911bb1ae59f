"""labutils — the importable half of the Wanda pruning lab. Notebooks use it as ``import labutils as lu``.

Data flows one way: config → model + tokenizer → calibration batches → for each decoder layer: capture
inputs → accumulate statistics → score → mask → apply → run the pruned layer → evaluate.
"""
from .core.errors import BadInput, LabError
from .core.config import DEFAULT_PROFILE, PROFILES, Profile, get_profile
from .core.device import (cuda_capability, device_summary, get_device, require_cuda, set_seed,
                     synchronize)
from .core.models import (embedded_gguf_path, embedded_model_dir, find_decoder_layers, find_linears, load_model,
                     load_pretrained, random_model, tiny_llama_config)
from .core.data import calibration_data, corpus_path, corpus_split, heldout_tokens, split_tokens, test_tokens
from .prune.calibration import (HessianAccumulator, InputNormAccumulator, LayerInputs, capture_layer_inputs,
                          collect_input_norms, collect_statistics, run_layer)
from .prune.masks import (SparsityTarget, apply_mask, as_target, nm_mask, parse_nm, prune_by_score, select_mask,
                    unstructured_mask)
from .prune.methods import (REGISTRY, Method, get_method, magnitude_score, output_error, ria_score, sparsegpt_weights,
                      wanda_score)
from .prune.owl import OwlConfig, layer_outlier_ratios, owl_sparsities
from .prune.driver import METHODS, PruneReport, calibration_stages, prune_model
from .prune.sparsity import mask_sha256, model_sparsity, nm_violations, prunable_linears, sparsity_table
from .evaluate.perplexity import perplexity
from .core.checkpoint import check_output_dir, is_lab_output, load_pruned, load_report, save_pruned
from .jobs.main_job import PruneJob, build_report, default_output_dir, ensure_pruned, run_prune_job, summary_table
from .evaluate.generation import (PROMPTS, Prompt, degeneration_table, drift_table, greedy_generate, mean_kl, passage_starts,
                        prompt_text, repeated_ngram_ratio, side_by_side, top1_agreement)
from .jobs.compare import Comparison, Variant, compare_methods, standard_variants, sweep_variants, write_results
from .lab.checks import (check_close, check_layer_sparsity, check_ria_score, check_top1_agreement, check_wanda_score,
                         data_sources, model_summary)
from .core.device import versions, versions_table
from .speed.timing import (TimingStats, decode_throughput, latency_table, memory_table, prefill_latency, random_prompt,
                        time_calls, time_interleaved, zeros_matmul_table)
from .sparse24.convert import prefill_speedup_table, semi_structured_ready, semi_structured_support, to_semi_structured, verify_semi_structured
from .sparse24.graphs import graphed_forward
from .sparse24.kernel import SparseLinear24
from .sparse24.shapes import linear_shapes, linear_speedup_table
from .jobs.bench_prune import bench_prune, bench_setup, forward_floor, saved_bench_results
from .evaluate.zeroshot.run import LOCAL_TASKS, PAPER_TASKS, profile_tasks, task_examples, zero_shot, zero_shot_table
from .evaluate.zeroshot.tasks import write_tasks
from .lab.tables import benchmark_summary
from .lab.plots import (outlier_summary, plot_benchmark_summary, plot_drift, plot_input_norms, plot_layer_sparsity,
                    plot_method_comparison, plot_perplexity, plot_sparsity_sweep)

__all__ = [name for name in dir() if not name.startswith("_")]
