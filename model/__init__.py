"""The model: the GPT definition, presets (tiny … 1T, seed-article), the planner
(parameters, FLOPs, memory per GPU for a parallel layout), pipeline
partitioning, and the DeepSpeed config builder and engine wrapper.
"""
