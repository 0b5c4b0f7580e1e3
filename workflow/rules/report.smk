# One report over every scene of this run: tables beside the paper's numbers, plots, renders.


rule report:
    input:
        report_input,
    output:
        html=report(
            "results/report/report.html",
            caption="../report/report.rst",
            category="Report",
            labels={"file": "report.html"},
        ),
        markdown="results/report/report.md",
        results=report(
            "results/report/results.csv",
            caption="../report/results_table.rst",
            category="Tables",
            labels={"table": "metrics"},
        ),
        paper=report(
            "results/report/paper.csv",
            caption="../report/paper_table.rst",
            category="Tables",
            labels={"table": "ours vs paper"},
        ),
        ablation=report(
            "results/report/ablation.csv",
            caption="../report/ablation_table.rst",
            category="Tables",
            labels={"table": "ablation"},
        ),
        blocks=report(
            "results/report/blocks.csv",
            caption="../report/blocks_table.rst",
            category="Tables",
            labels={"table": "blocks"},
        ),
    log:
        "results/report/report.log",
    benchmark:
        "results/report/benchmark.tsv"
    conda:
        "../../envs/mgs.yaml"
    params:
        # exactly the scenes of this invocation, never whatever else is under results/
        runs=report_runs,
        out=subpath(output.html, parent=True),
        settings=report_settings,
    shell:
        "mgs report --runs {params.runs} --out {params.out} > {log} 2>&1"
