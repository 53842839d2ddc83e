/* SPDX-License-Identifier: (GPL-2.0-only OR BSD-2-Clause) */
/* Node-wide limits that several features' maps share. */
#ifndef COMB_LIMITS_H
#define COMB_LIMITS_H

/* Local endpoints (pods) on one node: splice's comb_endpoints and the policy's
 * comb_policy_endpoints. */
#define COMB_MAX_ENDPOINTS 16384

#endif /* COMB_LIMITS_H */
