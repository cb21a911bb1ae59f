"""labutils — the importable half of the Wanda pruning lab. Notebooks use it as ``import labutils as lu``.

Data flows one way: config → model + tokenizer → calibration batches → for each decoder layer: capture
inputs → accumulate statistics → score → mask → apply → run the pruned layer → evaluate. The subpackages follow
it, and each imports only from those before it in this list:

- ``core``      errors, input checks, profiles, devices and seeds, safe saving, models, data, saved outputs
- ``prune``     the run's spec, masks, calibration passes, methods, OWL, the layer-by-layer driver (02-Prune)
- ``evaluate``  perplexity, generation and drift (03), zero-shot accuracy with lm-eval (04)
- ``speed``     timing, latency and memory tables (04)
- ``sparse24``  2:4 weights on sparse tensor cores: kernel, conversion, CUDA graphs, prefill and per-shape timing (04)
- ``jobs``      whole runs: the main job (``python -m labutils prune``), method comparison, bench-prune
- ``lab``       the course: exercise checks, student copies and grading, plots and summary tables

``lu.*`` is exactly ``__all__`` below: what the notebooks and README use, and the types needed to call it.
"""
import signal as _signal
import sys as _sys

if _sys.argv[:1] == ["-m"]:  # ``python -m labutils`` is importing the package: a Ctrl-C now is one line, not a traceback
    def _interrupted_while_starting(signum, frame):
        print("interrupted (Ctrl-C) while starting: nothing was done", file=_sys.stderr)
        raise SystemExit(130)

    _signal.signal(_signal.SIGINT, _interrupted_while_starting)  # the command line puts Python's own back (cli.main)

from .core.saved import disk_table, export_dense, load_pruned, load_report, save_pruned
from .core.config import DEFAULT_PROFILE, get_profile
from .core.data import calibration_data, corpus_split, heldout_tokens, test_tokens
from .core.device import cuda_capability, device_summary, get_device, set_seed, versions_table
from .core.errors import BadInput, LabError
from .deploy.engine import decode_speeds, gguf_generate, gguf_perplexity, llama_cpp_version, nll_of_logits
from .deploy.router import gguf_sparsity
from .deploy.gguf import export_gguf
from .deploy.loadtest import LoadTestResult, load_test, server_health, server_metrics
from .deploy.server import serving
from .core.sparse.bits import KeptMasks, kept_masks
from .core.sparse.model import quantize_model
from .core.sparse.quant import QUANTS, quant_record, quantize_dequantize
from .core.anatomy import find_decoder_layers, find_linears
from .core.loading import load_model, random_model, tiny_llama_config
from .evaluate.generation import (
                                  PROMPTS,
                                  degeneration_table,
                                  drift_table,
                                  format_answers,
                                  mean_kl,
                                  passage_starts,
                                  prompt_text,
                                  side_by_side,
)
from .evaluate.perplexity import perplexity
from .evaluate.zeroshot.run import LOCAL_TASKS, profile_tasks, task_examples, zero_shot, zero_shot_table
from .evaluate.zeroshot.tasks import write_tasks
from .jobs.calibration_study import (
                                  CalibrationRun,
                                  CalibrationStudy,
                                  domain_runs,
                                  nsamples_runs,
                                  seed_spread,
                                  seqlen_runs,
                                  windows_sha256,
)
from .jobs.bench_prune import bench_prune, bench_setup, saved_bench_results
from .jobs.compare import Comparison, compare_methods, standard_variants, sweep_variants, write_results
from .jobs.deployment import (
    PERPLEXITY_TOLERANCE,
    DeployEvidence,
    DeploySettings,
    checklist,
    damaged_copy,
    engine_table,
    generation_table,
    gguf_files,
    llama_cpp_rows,
    pytorch_rows,
)
from .jobs.main_job import PruneJob, default_output_dir, ensure_pruned, run_prune_job
from .jobs.quantized import (
    TARGET_OF_FP16,
    QuantStudySettings,
    fp16_bytes,
    layer_of,
    mask_bound,
    quantization_rows,
    quantization_table,
    target_line,
    zeros_table,
)
from .jobs.report import build_report
from .jobs.stream_job import LayerwisePerplexity
from .lab.checks import (
                                  check_close,
                                  check_layer_sparsity,
                                  check_nll,
                                  check_q4_0,
                                  check_masked_merge,
                                  check_mean_kl,
                                  check_nm_mask,
                                  check_perplexity,
                                  check_prediction,
                                  check_random_windows,
                                  check_ria_score,
                                  check_row_mask,
                                  check_top1_agreement,
                                  check_wanda_score,
)
from .lab.deploy_view import plot_engines
from .lab.environment import data_sources, model_summary
from .lab.sanity import SanityResult, sanity
from .lab.verdict import CheckFailed, CheckResult
from .lab.plots import (
                                  outlier_summary,
                                  plot_admm_convergence,
                                  plot_benchmark_summary,
                                  plot_calibration_domains,
                                  plot_calibration_sweep,
                                  plot_drift,
                                  plot_input_norms,
                                  plot_layer_sparsity,
                                  plot_method_comparison,
                                  plot_perplexity,
                                  plot_quantization,
                                  plot_recovery_losses,
                                  plot_sparsity_sweep,
)
from .lab.reference import compare_with_reference, reference_table
from .lab.tables import admm_gain, benchmark_summary, method_findings
from .prune.calibration import CalibrationData, capture_layer_inputs
from .prune.disk import CheckpointReader, DiskLayers, LayerCallbacks, load_outer, prune_streamed, skeleton
from .prune.driver import prune_model
from .prune.masks import SparsityTarget, as_target, parse_nm, select_mask, unstructured_mask
from .prune.methods import (
                                  METHODS,
                                  admm_update,
                                  get_method,
                                  magnitude_score,
                                  output_error,
                                  sparsegpt_weights,
                                  wanda_score,
)
from .prune.methods.admm import AdmmSettings
from .prune.owl import OwlConfig
from .prune.parallel import DataParallel, start_data_parallel
from .prune.recovery import RecoveryReport, RecoverySettings, recover
from .prune.report import PruneReport
from .prune.sparsity import mask_sha256, model_sparsity, sparsity_table
from .prune.spec import PruneSpec
from .prune.statistics import collect_input_norms, collect_statistics
from .sparse24.convert import (
                                  semi_structured_ready,
                                  semi_structured_support,
                                  to_semi_structured,
                                  verify_semi_structured,
)
from .sparse24.prefill import PrefillSettings, prefill_speedup_table
from .sparse24.shapes import LinearTimingSettings, linear_speedup_table
from .speed.latency import latency_table, load_time_table, memory_table, random_prompt, zeros_matmul_table

__all__ = [
    # core
    "BadInput", "LabError", "DEFAULT_PROFILE", "get_profile", "cuda_capability", "device_summary", "get_device",
    "set_seed", "versions_table", "find_decoder_layers", "find_linears", "load_model", "random_model",
    "tiny_llama_config", "calibration_data", "corpus_split", "heldout_tokens", "test_tokens", "load_pruned",
    "save_pruned", "load_report", "export_dense", "export_gguf", "disk_table", "KeptMasks", "kept_masks",
    "quantize_model", "quantize_dequantize", "quant_record", "QUANTS",
    # prune
    "SparsityTarget", "as_target", "parse_nm", "select_mask", "unstructured_mask", "capture_layer_inputs",
    "collect_input_norms", "collect_statistics", "METHODS", "get_method", "magnitude_score", "output_error",
    "sparsegpt_weights", "admm_update", "AdmmSettings", "wanda_score", "OwlConfig", "recover", "RecoveryReport",
    "RecoverySettings", "PruneSpec",
    "PruneReport", "prune_model", "mask_sha256",
    "model_sparsity", "sparsity_table", "CheckpointReader", "DiskLayers", "load_outer", "prune_streamed", "skeleton",
    "CalibrationData", "LayerCallbacks",
    "DataParallel", "start_data_parallel",
    # evaluate
    "perplexity", "PROMPTS", "degeneration_table", "drift_table", "mean_kl", "passage_starts", "prompt_text",
    "side_by_side", "format_answers", "LOCAL_TASKS", "profile_tasks", "task_examples", "zero_shot", "zero_shot_table", "write_tasks",
    # speed and 2:4
    "latency_table", "load_time_table", "memory_table", "random_prompt", "zeros_matmul_table", "prefill_speedup_table",
    "PrefillSettings", "semi_structured_ready", "semi_structured_support", "to_semi_structured",
    "verify_semi_structured", "linear_speedup_table", "LinearTimingSettings",
    # deploy (08-Deploy)
    "decode_speeds", "gguf_generate", "gguf_perplexity", "gguf_sparsity", "llama_cpp_version", "nll_of_logits", "LoadTestResult", "load_test",
    "server_health", "server_metrics", "serving",
    # jobs
    "PruneJob", "build_report", "default_output_dir", "ensure_pruned", "run_prune_job", "Comparison", "compare_methods",
    "standard_variants", "sweep_variants", "write_results", "TARGET_OF_FP16", "QuantStudySettings", "fp16_bytes",
    "layer_of", "mask_bound", "quantization_rows", "quantization_table", "target_line", "zeros_table", "bench_prune", "bench_setup", "saved_bench_results",
    "LayerwisePerplexity", "CalibrationRun", "CalibrationStudy", "domain_runs", "nsamples_runs", "seed_spread",
    "seqlen_runs", "windows_sha256", "PERPLEXITY_TOLERANCE", "DeployEvidence", "DeploySettings", "checklist",
    "damaged_copy", "engine_table", "generation_table", "gguf_files", "llama_cpp_rows", "pytorch_rows",
    # lab
    "CheckFailed", "CheckResult", "SanityResult", "sanity", "check_close", "check_layer_sparsity", "check_nll", "check_q4_0", "check_masked_merge", "check_mean_kl", "check_nm_mask",
    "check_perplexity", "check_prediction", "check_random_windows", "check_ria_score", "check_row_mask", "check_top1_agreement",
    "check_wanda_score", "data_sources", "model_summary", "outlier_summary", "plot_admm_convergence", "plot_benchmark_summary", "plot_calibration_domains", "plot_calibration_sweep", "plot_engines", "plot_quantization", "plot_recovery_losses", "plot_drift", "plot_input_norms",
    "plot_layer_sparsity", "plot_method_comparison", "plot_perplexity", "plot_sparsity_sweep", "benchmark_summary",
    "compare_with_reference", "reference_table", "admm_gain", "method_findings",
]
