"""The exp01 notebook's condition names, in its order: shared by its tables (exp01.py) and its figure."""

# The notebook's result keys, in its order.
EXP01_CONDITIONS = (
    "A1_baseline", "A2_bare_doc", "A3_baseline_offset",
    "B1_full_generated", "B2_full_perfect", "B3_full_static", "B4_full_suffix",
    "C1_trunc_generated_broken", "C2_trunc_generated_corrected",
    "C3_trunc_perfect_broken", "C4_trunc_perfect_corrected", "C5_trunc_static_corrected",
    "D1_trunc_suffix_corrected",
    "E1_random_prefix_trunc_corrected", "E2_full_random_prefix",
)
A3, B1, B2, B3, B4 = "A3_baseline_offset", "B1_full_generated", "B2_full_perfect", "B3_full_static", "B4_full_suffix"
C1, C2, C4, C5 = ("C1_trunc_generated_broken", "C2_trunc_generated_corrected",
                  "C4_trunc_perfect_corrected", "C5_trunc_static_corrected")
D1, E1 = "D1_trunc_suffix_corrected", "E1_random_prefix_trunc_corrected"
# kvprime's document-specificity control (not a notebook condition, so not in EXP01_CONDITIONS): C2 with the
# surrogate generated for another document of the run.
F1 = "F1_trunc_generated_other_corrected"
