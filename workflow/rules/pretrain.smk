rule pretrain:
    """The demo backbone (archs with backbone source 'pretrain'): the shared starting point of every
    task of one replicate seed."""
    output:
        f"{RUN}/backbone.safetensors",
    log:
        f"{RUN_LOGS}/pretrain.log",
    params:
        arch_hash=lambda wc: arch_digest(wc.arch),
    threads: threads_of("pretrain")
    resources:
        **resources_of("pretrain"),
    conda:
        "../envs/qvlib.yaml"
    shell:
        "{QV} pretrain --config {CONFIG} --arch {wildcards.arch} --seed {wildcards.seed} --threads {threads} "
        "-o {output} --no-progress 2> {log}"
