rule pretrain:
    """The demo backbone (archs with backbone source 'pretrain'): the shared starting point of every
    task of one replicate seed."""
    output:
        **store_outputs("backbone"),
        job=store_output("backbone", "job"),
    log:
        store_log("backbone"),
    params:
        job=lambda wc, output: job_file(wc),  # derived: the key, not the spelling, decides a rerun
    threads: threads_of("pretrain")
    resources:
        **resources_of("pretrain"),
    conda:
        "../envs/qvlib.yaml"
    shell:
        "printf '%s\\n' {params.job} > {output.job} && "
        "{QV} pretrain --config {output.job} --arch {wildcards.arch} --seed {wildcards.seed} --threads {threads} "
        "-o {output.ckpt} --no-progress 2> {log}"
