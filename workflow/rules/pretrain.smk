rule pretrain:
    """The demo backbone (archs with backbone source 'pretrain'): the shared starting point of every task."""
    output:
        f"{OUT}/{{arch}}/backbone.safetensors",
    log:
        f"{LOGS}/{{arch}}/pretrain.log",
    params:
        h=lambda wc: arch_digest(wc.arch),
    threads: threads_of("pretrain")
    resources:
        **resources_of("pretrain"),
    shell:
        "qv pretrain --config {CONFIG} --arch {wildcards.arch} --threads {threads} -o {output} --no-progress 2> {log}"
