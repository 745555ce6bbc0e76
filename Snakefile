# qvlib workflow: FT and QAT fine-tuning per (arch, task), quantization vectors, the donor x receiver
# grid with controls, and its tables and figures. Rules are thin `qv` calls (workflow/rules/);
# the method lives in qvlib/. Run: snakemake --cores 2  (or --configfile config/paper.yaml ...).

# The embedded default, unless the user named a config file (--configfile replaces it, never merges);
# `--config key=value` alone changes keys of the default (e.g. --config 'seeds=[0,1,2]').
if not workflow.overwrite_configfiles:

    configfile: "config/config.yaml"


include: "workflow/rules/common.smk"
include: "workflow/rules/pretrain.smk"
include: "workflow/rules/finetune.smk"
include: "workflow/rules/vectors.smk"
include: "workflow/rules/evaluate.smk"
include: "workflow/rules/report.smk"


rule all:
    input:
        final_outputs(),
    default_target: True
