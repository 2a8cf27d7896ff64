/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * What the C tests without GLib share: TAP output (ok, tap_done) and the owned error strings
 * of the qcow2 functions (take). One test per program: the state is static.
 */
#ifndef HBITMAP_C_TESTS_TAP_H
#define HBITMAP_C_TESTS_TAP_H

#include <stdio.h>
#include <stdlib.h>

static int failures;
static int tests;

/* One TAP line: `what` passed if `condition`, else failed with `detail` (may be NULL). */
static void ok(int condition, const char *what, const char *detail)
{
    tests++;
    if (condition) {
        printf("ok %d - %s\n", tests, what);
    } else {
        failures++;
        printf("not ok %d - %s%s%s\n", tests, what, detail ? ": " : "", detail ? detail : "");
    }
}

/* A copy of the library's message (valid until the next call), which is freed and cleared. */
static char *take(char **message)
{
    static char copy[4096];
    copy[0] = 0;
    if (*message) {
        snprintf(copy, sizeof copy, "%s", *message);
        free(*message);
        *message = NULL;
    }
    return copy;
}

/* The TAP plan, and the exit status of the program. */
static int tap_done(void)
{
    printf("1..%d\n", tests);
    return failures ? 1 : 0;
}

#endif
