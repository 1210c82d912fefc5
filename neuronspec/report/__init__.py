"""Presentation of a run: the HTML report (:mod:`.html`), the results diff for CI
(:mod:`.diff`), the findings summary printed after ``pytest specs/`` (:mod:`.summary`), and
what the plugin records for them (:mod:`.recorder`, :mod:`.outcomes`, :mod:`.tokens`).

Everything here reads the results file alone: no models, torch or cache. Conventions an
analysis follows to be presented well (each documented where it is defined):

- headline numbers: one ``@headline("analysis")`` entry in :mod:`.headlines`;
- token ids shown as text: a finding field named ``token(s)``/``*_token(s)``/``*_token_id(s)``
  holds token ids (:func:`.results.is_token_field`), decoded into the results by the plugin;
- figures: ``<analysis>[_detail]_<model>.png`` in ``--plots-dir`` (:mod:`.html`);
- a spec's hypothesis: the first paragraph of its docstring; its measured numbers: pytest's
  ``record_property(name, value)`` (:mod:`.outcomes`).
"""
