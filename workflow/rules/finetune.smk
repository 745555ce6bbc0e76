rule finetune:
    """Plain fine-tuning (FT) of one task's block linear weights from the shared backbone, at one
    replicate seed. FT never reads the quantizer: it is shared by every quantizer (and every config)."""
    input:
        unpack(job_inputs),
    output:
        **store_outputs("ft"),
        job=store_output("ft", "job"),
    log:
        store_log("ft"),
    params:
        job=lambda wc, output: job_file(wc),  # derived: the key, not the spelling, decides a rerun
        backbone=backbone_flag,
    threads: threads_of("finetune")
    resources:
        **resources_of("finetune"),
    conda:
        "../envs/qvlib.yaml"
    shell:
        "printf '%s\\n' {params.job} > {output.job} && "
        "{QV} finetune --config {output.job} --arch {wildcards.arch} --seed {wildcards.seed} --task {wildcards.task} "
        "--mode ft {params.backbone} --threads {threads} -o {output.ckpt} --no-progress 2> {log}"


rule qat:
    """Quantization-aware fine-tuning of one task with one quantizer (its tag in {quant}); the same
    settings as FT otherwise. Adding a quantizer runs these jobs and what follows them, never FT."""
    input:
        unpack(job_inputs),
    output:
        **store_outputs("qat"),
        job=store_output("qat", "job"),
    log:
        store_log("qat"),
    params:
        job=lambda wc, output: job_file(wc),  # derived: the key, not the spelling, decides a rerun
        backbone=backbone_flag,
    threads: threads_of("finetune")
    resources:
        **resources_of("finetune"),
    conda:
        "../envs/qvlib.yaml"
    shell:
        "printf '%s\\n' {params.job} > {output.job} && "
        "{QV} finetune --config {output.job} --arch {wildcards.arch} --seed {wildcards.seed} --quant {wildcards.quant} "
        "--task {wildcards.task} --mode qat {params.backbone} --threads {threads} -o {output.ckpt} --no-progress 2> {log}"
