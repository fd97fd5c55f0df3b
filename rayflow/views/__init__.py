"""What a person looks at: tables, progress bars, timelines and plots over rayflow's records.

The one place below the face that knows rich, IPython and matplotlib. Views sit above the engines
(the swarm, the hub, the bank): they read what the engines record and never drive them, and no
engine imports a view, so the engines run where no terminal or notebook is.

* ``job_result``: :class:`JobResult`, what ``swarm.run(job)`` returns, with its bounded table,
  rich and HTML forms and JSON round trip;
* ``progress``: a running job's progress (rich in a terminal, HTML in a notebook, a log otherwise);
* ``timeline``: the Diagram-9 timeline of a job's phases per worker (PNG and self-contained HTML);
* ``retrieval_table``: a ReasoningBank search with every score component.
"""
