# qvlib workflow: FT and QAT fine-tuning per (arch, task), quantization vectors, the donor x receiver
# grid and its tables and figures. Rules live in workflow/rules/; method code lives in qvlib/.
configfile: "config/config.yaml"


rule all:
    input: []
