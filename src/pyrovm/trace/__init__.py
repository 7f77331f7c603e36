"""A live trace of pyrovm's KVM calls beside the kernel's own view (``pyrovm trace``, ``run --trace``).

- :mod:`~pyrovm.trace.recorder`: every ioctl pyrovm issues and the ``KVM_RUN`` exits;
- :mod:`~pyrovm.trace.decode`: their arguments and exits, decoded;
- :mod:`~pyrovm.trace.kernel`: the kernel functions behind each call (``kernel_paths.json``), checked
  against ``/proc/kallsyms``;
- :mod:`~pyrovm.trace.tracefs`: KVM's trace events for this process's threads (root);
- :mod:`~pyrovm.trace.output`: the merged timeline as text, JSON lines or Chrome trace events;
- :mod:`~pyrovm.trace.session`: all of it around one VM's life.
"""
