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
        settings_hash=lambda wc: digest(arch_digest(wc.arch), task_digest(wc.task), config["finetune"], config["quant"],
                                       config.get("policy")),
    threads: threads_of("finetune")
    resources:
        **resources_of("finetune"),
    conda:
        "../envs/qvlib.yaml"
    shell:
        "{QV} finetune --config {CONFIG} --arch {wildcards.arch} --seed {wildcards.seed} --task {wildcards.task} "
        "--mode {wildcards.mode} {params.backbone} --threads {threads} -o {output.ckpt} --no-progress 2> {log}"
