"""The reproducible lab: sweeps (``experiments/*.sh``), the committed run records (``experiments/runs``) and the
reports built from them, run through one command line, ``python -m experiments <command>`` (``__main__.py``).

Data flows one way, and a module imports only modules of the stages before its own
(``tests/test_experiments_imports.py`` checks it):

1. runs: ``records`` (reading the run records), ``collect`` (multirun/ -> experiments/runs, the lr chosen per
   ablation family), ``recover`` (records rebuilt from console logs);
2. statistics: ``stats``, ``power`` (the seeds a check needs, its minimum detectable effect);
3. claims: ``claims`` (the paper's claims, the families of experiments/PREREGISTRATION.md and their verdicts);
4. tables and plots: ``tables``, ``plots``;
5. sections of the README: ``ablations``, ``schedule``, ``recipe``, ``primary`` (LoRA vs full fine-tuning);
6. reports: ``report`` (experiments/README.md, results/tables.md) and the studies with reports of their own:
   ``subspace`` (§7.2 / §7.3), ``precision``, ``decoder``, ``two_tasks``;
7. the command line: ``__main__``;
8. ``summarize``: every report at once (``python -m experiments.summarize``), through the command line.
"""
