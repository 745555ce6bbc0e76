rule finetune:
    """FT or QAT of one task's block linear weights from the shared backbone, at one replicate seed."""
    input:
        backbone=backbone_input,
    output:
        ckpt=f"{RUN}/checkpoints/{{task}}.{{mode}}.safetensors",
        metrics=f"{RUN}/checkpoints/{{task}}.{{mode}}.metrics.json",
    log:
        f"{RUN_LOGS}/finetune/{{task}}.{{mode}}.log",
    params:
        backbone=backbone_flag,
        # FT never reads the quantizer: changing `quant` reruns QAT (and what follows), never FT
        settings_hash=lambda wc: digest(arch_digest(wc.arch), task_digest(wc.task), config["finetune"], config.get("policy"),
                                        config["quant"] if wc.mode == "qat" else None),
    threads: threads_of("finetune")
    resources:
        **resources_of("finetune"),
    conda:
        "../envs/qvlib.yaml"
    shell:
        "{QV} finetune --config {CONFIG} --arch {wildcards.arch} --seed {wildcards.seed} --task {wildcards.task} "
        "--mode {wildcards.mode} {params.backbone} --threads {threads} -o {output.ckpt} --no-progress 2> {log}"
