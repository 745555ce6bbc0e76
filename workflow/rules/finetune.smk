rule finetune:
    """Plain fine-tuning (FT) of one task's block linear weights from the shared backbone, at one
    replicate seed. FT never reads the quantizer: it is shared by every quantizer of the run."""
    input:
        backbone=backbone_input,
    output:
        ckpt=f"{RUN}/checkpoints/{{task}}.ft.safetensors",
        metrics=f"{RUN}/checkpoints/{{task}}.ft.metrics.json",
    log:
        f"{RUN_LOGS}/finetune/{{task}}.ft.log",
    params:
        backbone=backbone_flag,
        settings_hash=train_digest,
    threads: threads_of("finetune")
    resources:
        **resources_of("finetune"),
    conda:
        "../envs/qvlib.yaml"
    shell:
        "{QV} finetune --config {CONFIG} --arch {wildcards.arch} --seed {wildcards.seed} --task {wildcards.task} "
        "--mode ft {params.backbone} --threads {threads} -o {output.ckpt} --no-progress 2> {log}"


rule qat:
    """Quantization-aware fine-tuning of one task with one quantizer (its tag in {quant}); the same
    settings as FT otherwise. Adding a quantizer runs these jobs and what follows them, never FT."""
    input:
        backbone=backbone_input,
    output:
        ckpt=f"{QRUN}/checkpoints/{{task}}.qat.safetensors",
        metrics=f"{QRUN}/checkpoints/{{task}}.qat.metrics.json",
    log:
        f"{QRUN_LOGS}/finetune/{{task}}.qat.log",
    params:
        backbone=backbone_flag,
        settings_hash=lambda wc: train_digest(wc, quant_json(wc)),
    threads: threads_of("finetune")
    resources:
        **resources_of("finetune"),
    conda:
        "../envs/qvlib.yaml"
    shell:
        "{QV} finetune --config {CONFIG} --arch {wildcards.arch} --seed {wildcards.seed} --quant {wildcards.quant} "
        "--task {wildcards.task} --mode qat {params.backbone} --threads {threads} -o {output.ckpt} --no-progress 2> {log}"
