/*
 * Additions to the config API of config.h.
 */
#ifndef MOE_CONFIG_EXTRA_H
#define MOE_CONFIG_EXTRA_H

#include "config.h"

/* A moe_config owns the strings of its router options: opts[i].key points
 * into opt_keys[i] and, for string options, opts[i].s into opt_strs[i]
 * (NULL for other types). Those pointers point into the struct itself, so a
 * copy made with `=` or memcpy still points into the ORIGINAL. Call this on
 * the copy before handing its options to anyone:
 *
 *     moe_config run = base;           // e.g. one point of a sweep
 *     moe_config_fix_pointers(&run);
 *
 * moe_config_defaults and moe_config_load leave their result fixed. */
void moe_config_fix_pointers(moe_config *cfg);

/* Behaviour of moe_config_load beyond what config.h states:
 *   - path may be NULL: defaults plus overrides, no file (cfg->source = "").
 *   - A relative data.path from the FILE is resolved (and made absolute)
 *     only when it exists beside the file; one given with --set is always
 *     taken relative to the working directory, as a shell user expects.
 *   - Loading ends with the same cross-key checks as moe_config_validate,
 *     so their messages can name the line of the offending key.
 *   - On error cfg holds a partly loaded config; use it for nothing. */

#endif
