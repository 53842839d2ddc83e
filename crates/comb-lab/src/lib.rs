//! Comb's lab: nodes and pods as network namespaces, veths and cgroups on one machine
