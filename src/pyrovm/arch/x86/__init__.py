"""x86-64: memory layout, GDT, page tables, CPUID, MSRs, boot structures and vCPU register set-up."""
