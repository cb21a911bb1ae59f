"""Zero-shot accuracy with lm-eval (04-Benchmark): ``run`` evaluates; ``tasks`` writes the offline task files in
``lm_tasks/``, from items that ``lastword`` and ``nextsentence`` build out of text cleaned and split by ``sentences``."""
