/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * GLib tests of the hbitmap C API (QEMU's include/qemu/hbitmap.h), in the spirit of QEMU's
 * tests/unit/test-hbitmap.c: every operation is mirrored on a plain "shadow" array with one byte
 * per group, and the bitmap is checked against it (count, iteration, get). Expected values come
 * from the semantics of the original util/hbitmap.c.
 *
 * Built twice by meson, linked to libhbitmap.so and to libhbitmap.a, and run a third time on the
 * original C library when ../shared/reference is there. Environment:
 *   HBITMAP_TEST_IMPL=original    running on the original C: skip the checks of this library's
 *                                 abort messages and of the fixes it takes from later QEMU
 *   HBITMAP_TEST_NO_SUBPROCESS=1  skip the tests that expect an abort (set by the valgrind setup)
 */
#include <glib.h>
#include <signal.h>
#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <unistd.h>

#include "hbitmap.h"

#ifndef HBITMAP_TEST_LINKAGE
#define HBITMAP_TEST_LINKAGE "unknown"
#endif

/* Items covered by one word, one second-last-level word and one third-last-level word. */
#define L1 UINT64_C(64)
#define L2 (L1 * L1)
#define L3 (L2 * L1)

static bool testing_original;
static bool no_subprocess;

static bool skip_on_original(const char *why)
{
    if (testing_original) {
        g_test_skip(why);
        return true;
    }
    return false;
}

/* ---- the shadow fixture ------------------------------------------------------------------ */

typedef struct {
    HBitmap *hb;
    HBitmap *meta;      /* owned by hb: freed with hbitmap_free_meta */
    guint8 *shadow;     /* one byte per group, 1 when dirty */
    uint64_t size;      /* items */
    uint64_t groups;
    int granularity;
} Fixture;

static uint64_t groups_for(uint64_t size, int granularity)
{
    return (size + (UINT64_C(1) << granularity) - 1) >> granularity;
}

static uint64_t shadow_dirty_groups(const Fixture *f)
{
    uint64_t dirty = 0;
    for (uint64_t g = 0; g < f->groups; g++) {
        dirty += f->shadow[g];
    }
    return dirty;
}

/* The first dirty group at or after `group`, or -1. */
static int64_t shadow_next_dirty(const Fixture *f, uint64_t group)
{
    for (; group < f->groups; group++) {
        if (f->shadow[group]) {
            return (int64_t)group;
        }
    }
    return -1;
}

/* Iterating from `first` reports exactly the dirty groups from first's group on. */
static void fixture_check_iter(const Fixture *f, uint64_t first)
{
    HBitmapIter hbi;
    uint64_t group = first >> f->granularity;

    hbitmap_iter_init(&hbi, f->hb, first);
    g_assert_true(hbi.hb == f->hb);
    g_assert_cmpint(hbi.granularity, ==, f->granularity);
    for (;;) {
        int64_t expected = shadow_next_dirty(f, group);
        int64_t next = hbitmap_iter_next(&hbi, true);

        g_assert_cmpint(next, ==, expected < 0 ? -1 : (int64_t)((uint64_t)expected << f->granularity));
        if (next < 0) {
            break;
        }
        group = (uint64_t)expected + 1;
    }
    /* The end is sticky. */
    g_assert_cmpint(hbitmap_iter_next(&hbi, true), ==, -1);
}

/* Count, emptiness, iteration from 0 and hbitmap_get of every group's first and last item. */
static void fixture_check(const Fixture *f)
{
    uint64_t dirty = shadow_dirty_groups(f);

    g_assert_cmpuint(hbitmap_count(f->hb), ==, dirty << f->granularity);
    g_assert_cmpint(hbitmap_empty(f->hb), ==, dirty == 0);
    if (f->groups == 0) {
        return;     /* nothing to iterate: hbitmap_iter_init would abort */
    }
    fixture_check_iter(f, 0);
    for (uint64_t g = 0; g < f->groups; g++) {
        uint64_t first = g << f->granularity;
        uint64_t last = first + ((UINT64_C(1) << f->granularity) - 1);

        g_assert_cmpint(hbitmap_get(f->hb, first), ==, f->shadow[g]);
        g_assert_cmpint(hbitmap_get(f->hb, last), ==, f->shadow[g]);
    }
}

static void fixture_init(Fixture *f, uint64_t size, int granularity)
{
    f->hb = hbitmap_alloc(size, granularity);
    f->meta = NULL;
    f->size = size;
    f->granularity = granularity;
    f->groups = groups_for(size, granularity);
    f->shadow = g_malloc0(f->groups + 1);
    g_assert_nonnull(f->hb);
    g_assert_cmpint(hbitmap_granularity(f->hb), ==, granularity);
    fixture_check(f);
}

static void fixture_teardown(Fixture *f, gconstpointer data)
{
    (void)data;
    if (f->meta) {
        hbitmap_free_meta(f->hb);
    }
    if (f->hb) {
        hbitmap_free(f->hb);
    }
    g_free(f->shadow);
}

static void shadow_mark(Fixture *f, uint64_t start, uint64_t count, guint8 value)
{
    if (count == 0) {
        return;
    }
    for (uint64_t g = start >> f->granularity; g <= (start + count - 1) >> f->granularity; g++) {
        f->shadow[g] = value;
    }
}

static void fixture_set(Fixture *f, uint64_t start, uint64_t count)
{
    hbitmap_set(f->hb, start, count);
    shadow_mark(f, start, count, 1);
}

static void fixture_reset(Fixture *f, uint64_t start, uint64_t count)
{
    hbitmap_reset(f->hb, start, count);
    shadow_mark(f, start, count, 0);
}

static void fixture_reset_all(Fixture *f)
{
    hbitmap_reset_all(f->hb);
    memset(f->shadow, 0, f->groups);
}

/* Shrinking drops the groups past the new last one (a partial last group keeps its bit);
 * growing adds clean groups. */
static void fixture_truncate(Fixture *f, uint64_t size)
{
    uint64_t groups = groups_for(size, f->granularity);

    hbitmap_truncate(f->hb, size);
    f->shadow = g_realloc(f->shadow, groups + 1);
    if (groups > f->groups) {
        memset(f->shadow + f->groups, 0, groups - f->groups);
    }
    f->shadow[groups] = 0;
    f->groups = groups;
    f->size = size;
}

/* The original's next_zero, on the shadow: the first item of [start, end) whose group is
 * clean (start itself if its group is), where a count reaching past the size means "to the
 * end of the last group". */
static int64_t ref_next_zero(const Fixture *f, uint64_t start, uint64_t count)
{
    uint64_t end;

    if (start >= f->size || count == 0) {
        return -1;
    }
    end = count > f->size - start ? f->groups << f->granularity : start + count;
    for (uint64_t g = start >> f->granularity; g < f->groups; g++) {
        uint64_t item = MAX(g << f->granularity, start);

        if (item >= end) {
            break;
        }
        if (!f->shadow[g]) {
            return (int64_t)item;
        }
    }
    return -1;
}

/* The original's next_dirty_area, on the shadow. */
static bool ref_next_dirty_area(const Fixture *f, uint64_t *start, uint64_t *count)
{
    uint64_t end, group_size = UINT64_C(1) << f->granularity;
    uint64_t first_dirty, area_end;
    int64_t group;

    if (*start >= f->size || *count == 0) {
        return false;
    }
    end = *count > f->size - *start ? f->size : *start + *count;
    group = shadow_next_dirty(f, *start >> f->granularity);
    if (group < 0 || ((uint64_t)group << f->granularity) >= end) {
        return false;
    }
    first_dirty = (uint64_t)group << f->granularity;
    area_end = end;
    if (first_dirty + group_size < end) {
        int64_t zero = ref_next_zero(f, first_dirty + group_size, end - first_dirty - group_size);
        if (zero >= 0) {
            area_end = (uint64_t)zero;
        }
    }
    *start = MAX(first_dirty, *start);
    *count = area_end - *start;
    return true;
}

static void check_next_zero(const Fixture *f, uint64_t start, uint64_t count)
{
    g_assert_cmpint(hbitmap_next_zero(f->hb, start, count), ==, ref_next_zero(f, start, count));
}

static void check_next_dirty_area(const Fixture *f, uint64_t start, uint64_t count)
{
    uint64_t got_start = start, got_count = count;
    uint64_t want_start = start, want_count = count;
    bool got = hbitmap_next_dirty_area(f->hb, &got_start, &got_count);
    bool want = ref_next_dirty_area(f, &want_start, &want_count);

    g_assert_cmpint(got, ==, want);
    g_assert_cmpuint(got_start, ==, want_start);
    g_assert_cmpuint(got_count, ==, want_count);
}

/* Iterating from `first` gives exactly `items`, then -1. */
static void expect_iter(const HBitmap *hb, uint64_t first, const int64_t *items, size_t n)
{
    HBitmapIter hbi;

    hbitmap_iter_init(&hbi, hb, first);
    for (size_t i = 0; i < n; i++) {
        g_assert_cmpint(hbitmap_iter_next(&hbi, true), ==, items[i]);
    }
    g_assert_cmpint(hbitmap_iter_next(&hbi, true), ==, -1);
}

#define EXPECT_ITER(hb, first, ...)                                                 \
    do {                                                                            \
        static const int64_t items_[] = { __VA_ARGS__ };                            \
        expect_iter((hb), (first), items_, G_N_ELEMENTS(items_));                   \
    } while (0)

static void expect_dirty_area_at(const HBitmap *hb, uint64_t start, uint64_t count,
                                 uint64_t want_start, uint64_t want_count)
{
    g_assert_true(hbitmap_next_dirty_area(hb, &start, &count));
    g_assert_cmpuint(start, ==, want_start);
    g_assert_cmpuint(count, ==, want_count);
}

/* ---- layout and allocation ---------------------------------------------------------------- */

static void test_layout(void)
{
    struct {
        unsigned char before[16];
        HBitmapIter hbi;
        unsigned char after[16];
    } guarded;
    HBitmap *hb = hbitmap_alloc(L3, 0);

    g_assert_cmpuint(sizeof(HBitmapIter), ==, 80);
    g_assert_cmpuint(offsetof(HBitmapIter, hb), ==, 0);
    g_assert_cmpuint(offsetof(HBitmapIter, granularity), ==, 8);
    g_assert_cmpuint(offsetof(HBitmapIter, pos), ==, 16);
    g_assert_cmpuint(offsetof(HBitmapIter, cur), ==, 24);
    g_assert_cmpuint(sizeof(guarded.hbi.cur), ==, HBITMAP_LEVELS * sizeof(unsigned long));
    g_assert_cmpuint(HBITMAP_LEVELS, ==, 7);
    g_assert_cmpuint(BITS_PER_LEVEL, ==, 6);
    g_assert_cmpuint(BITS_PER_LONG, ==, 64);
    g_assert_cmpuint(HBITMAP_LOG_MAX_SIZE, ==, 41);

    /* hbitmap_iter_init writes the 80 bytes and nothing around them. */
    memset(&guarded, 0xa5, sizeof(guarded));
    hbitmap_set(hb, L3 - 1, 1);
    hbitmap_iter_init(&guarded.hbi, hb, L2 + 3);
    for (size_t i = 0; i < sizeof(guarded.before); i++) {
        g_assert_cmpuint(guarded.before[i], ==, 0xa5);
        g_assert_cmpuint(guarded.after[i], ==, 0xa5);
    }
    g_assert_true(guarded.hbi.hb == hb);
    g_assert_cmpint(guarded.hbi.granularity, ==, 0);
    g_assert_cmpuint(guarded.hbi.pos, ==, (L2 + 3) / 64);
    g_assert_cmpint(hbitmap_iter_next(&guarded.hbi, true), ==, (int64_t)(L3 - 1));
    hbitmap_free(hb);
}

static void test_size_zero(Fixture *f, gconstpointer data)
{
    HBitmap *other = hbitmap_alloc(0, 0);
    uint64_t start = 0, count = 1;
    char *digest;

    (void)data;
    fixture_init(f, 0, 0);
    g_assert_true(hbitmap_empty(f->hb));
    g_assert_cmpuint(hbitmap_count(f->hb), ==, 0);
    g_assert_cmpint(hbitmap_next_zero(f->hb, 0, 1), ==, -1);
    g_assert_false(hbitmap_next_dirty_area(f->hb, &start, &count));
    g_assert_cmpuint(start, ==, 0);
    g_assert_cmpuint(count, ==, 1);
    g_assert_cmpuint(hbitmap_serialization_size(f->hb, 0, 0), ==, 0);
    g_assert_true(hbitmap_can_merge(f->hb, other));
    g_assert_true(hbitmap_merge(f->hb, other, f->hb));
    hbitmap_truncate(f->hb, 0);
    fixture_check(f);
    /* The last level still has one (zero) word. */
    digest = hbitmap_sha256(f->hb, NULL);
    g_assert_cmpstr(digest, ==, "af5570f5a1810b7af78caf4bc70a660f0df51e42baf91d4de5b2328de0e83dfc");
    g_free(digest);
    hbitmap_free(other);
}

static void test_granularities(void)
{
    for (int g = 0; g < 64; g++) {
        HBitmap *hb = hbitmap_alloc(1000, g);

        g_assert_cmpint(hbitmap_granularity(hb), ==, g);
        g_assert_true(hbitmap_empty(hb));
        g_assert_cmpint(hbitmap_is_serializable(hb), ==, g < 58);
        if (g < 58) {
            g_assert_cmpuint(hbitmap_serialization_align(hb), ==, UINT64_C(64) << g);
        }
        /* One group whatever the granularity past 9: item 0 to 999 all land in group 0. */
        hbitmap_set(hb, 999, 1);
        g_assert_true(hbitmap_get(hb, 0) == (g >= 10));
        g_assert_true(hbitmap_get(hb, 999));
        g_assert_cmpuint(hbitmap_count(hb), ==, UINT64_C(1) << g);
        hbitmap_free(hb);
    }
}

static void test_free_null(void)
{
    if (skip_on_original("the original dereferences NULL in hbitmap_free")) {
        return;
    }
    hbitmap_free(NULL);
}

/* ---- granularity ------------------------------------------------------------------------- */

/* The example in the comment of the original's struct HBitmap: size 16, granularity 1. */
static void test_granularity_struct_example(Fixture *f, gconstpointer data)
{
    (void)data;
    fixture_init(f, 16, 1);
    fixture_set(f, 0, 9);
    EXPECT_ITER(f->hb, 0, 0, 2, 4, 6, 8);
    g_assert_cmpuint(hbitmap_count(f->hb), ==, 10);
    fixture_reset(f, 1, 3);
    EXPECT_ITER(f->hb, 0, 4, 6, 8);
    g_assert_cmpuint(hbitmap_count(f->hb), ==, 6);
    fixture_set(f, 9, 2);
    EXPECT_ITER(f->hb, 0, 4, 6, 8, 10);
    g_assert_cmpuint(hbitmap_count(f->hb), ==, 8);
    /* Items 5..9 are groups 2..4; group 5 (items 10, 11) stays dirty. The comment's last line
     * (00000000) is wrong about that: the code never cleared it. */
    fixture_reset(f, 5, 5);
    EXPECT_ITER(f->hb, 0, 10);
    g_assert_cmpuint(hbitmap_count(f->hb), ==, 2);
    fixture_reset(f, 10, 1);
    EXPECT_ITER(f->hb, 0);
    g_assert_true(hbitmap_empty(f->hb));
    fixture_check(f);
}

/* QEMU's test_hbitmap_granularity. */
static void test_granularity_qemu(Fixture *f, gconstpointer data)
{
    (void)data;
    fixture_init(f, L1, 1);
    fixture_set(f, 0, 1);
    g_assert_cmpuint(hbitmap_count(f->hb), ==, 2);
    fixture_check(f);
    fixture_set(f, 2, 1);
    g_assert_cmpuint(hbitmap_count(f->hb), ==, 4);
    fixture_check(f);
    fixture_set(f, 0, 3);
    g_assert_cmpuint(hbitmap_count(f->hb), ==, 4);
    fixture_reset(f, 0, 2);
    g_assert_cmpuint(hbitmap_count(f->hb), ==, 2);
    fixture_check(f);
}

/* A partial reset cleans the whole group; a partial set dirties it. */
static void test_granularity_partial(Fixture *f, gconstpointer data)
{
    (void)data;
    fixture_init(f, 100, 3);                    /* 13 groups, the last one items 96..103 */
    fixture_set(f, 5, 1);
    g_assert_cmpuint(hbitmap_count(f->hb), ==, 8);
    g_assert_true(hbitmap_get(f->hb, 0));
    g_assert_true(hbitmap_get(f->hb, 7));
    g_assert_false(hbitmap_get(f->hb, 8));
    EXPECT_ITER(f->hb, 0, 0);
    fixture_set(f, 96, 4);
    g_assert_cmpuint(hbitmap_count(f->hb), ==, 16);
    g_assert_true(hbitmap_get(f->hb, 103));     /* past the size, inside the last group */
    EXPECT_ITER(f->hb, 0, 0, 96);
    fixture_set(f, 0, 100);
    g_assert_cmpuint(hbitmap_count(f->hb), ==, 104);
    fixture_reset(f, 9, 1);                     /* group 1: items 8..15 */
    g_assert_cmpuint(hbitmap_count(f->hb), ==, 96);
    g_assert_cmpint(hbitmap_next_zero(f->hb, 0, 100), ==, 8);
    g_assert_cmpint(hbitmap_next_zero(f->hb, 12, 100), ==, 12);
    fixture_check(f);
}

/* ---- iteration --------------------------------------------------------------------------- */

static void test_iter_empty(Fixture *f, gconstpointer data)
{
    HBitmapIter hbi;

    (void)data;
    fixture_init(f, L1, 0);
    fixture_check(f);
    hbitmap_iter_init(&hbi, f->hb, 0);
    g_assert_cmpint(hbitmap_iter_next(&hbi, true), ==, -1);
    g_assert_cmpint(hbitmap_iter_next(&hbi, false), ==, -1);
    g_assert_cmpint(hbitmap_iter_next(&hbi, true), ==, -1);
}

/* QEMU's test_hbitmap_iter_partial: iteration from many starting points. */
static void test_iter_partial(Fixture *f, gconstpointer data)
{
    static const uint64_t firsts[] = {
        0, 1, L1 - 1, L1, L1 * 2 - 1, L2 - 1, L2, L2 + 1, L2 + L1 - 1, L2 + L1,
        L2 * 2 - 1, L2 * 2, L3 / 2, L3 - L1, L3 - 1,
    };

    (void)data;
    fixture_init(f, L3, 0);
    fixture_set(f, 0, L3);
    for (size_t i = 0; i < G_N_ELEMENTS(firsts); i++) {
        HBitmapIter hbi;

        hbitmap_iter_init(&hbi, f->hb, firsts[i]);
        g_assert_cmpint(hbitmap_iter_next(&hbi, true), ==, (int64_t)firsts[i]);
        if (firsts[i] + 1 < L3) {
            g_assert_cmpint(hbitmap_iter_next(&hbi, true), ==, (int64_t)firsts[i] + 1);
        }
    }
    fixture_reset(f, 0, L3);
    fixture_set(f, L3 - 1, 1);
    for (size_t i = 0; i < G_N_ELEMENTS(firsts); i++) {
        fixture_check_iter(f, firsts[i]);
    }
    fixture_set(f, L2 + L1, 1);
    fixture_set(f, L1 - 1, 1);
    for (size_t i = 0; i < G_N_ELEMENTS(firsts); i++) {
        fixture_check_iter(f, firsts[i]);
    }
}

/* QEMU's test_hbitmap_iter_granularity. */
static void test_iter_granularity(Fixture *f, gconstpointer data)
{
    HBitmapIter hbi;

    (void)data;
    fixture_init(f, UINT64_C(131072) << 7, 7);
    hbitmap_iter_init(&hbi, f->hb, 0);
    g_assert_cmpint(hbitmap_iter_next(&hbi, true), <, 0);

    fixture_set(f, ((L2 + L1 + 1) << 7) + 8, 8);
    hbitmap_iter_init(&hbi, f->hb, 0);
    g_assert_cmpint(hbitmap_iter_next(&hbi, true), ==, (int64_t)((L2 + L1 + 1) << 7));
    g_assert_cmpint(hbitmap_iter_next(&hbi, true), <, 0);

    hbitmap_iter_init(&hbi, f->hb, (L2 + L1 + 2) << 7);
    g_assert_cmpint(hbitmap_iter_next(&hbi, true), <, 0);

    fixture_set(f, (UINT64_C(131072) << 7) - 8, 8);
    hbitmap_iter_init(&hbi, f->hb, 0);
    g_assert_cmpint(hbitmap_iter_next(&hbi, true), ==, (int64_t)((L2 + L1 + 1) << 7));
    g_assert_cmpint(hbitmap_iter_next(&hbi, true), ==, INT64_C(131071) << 7);
    g_assert_cmpint(hbitmap_iter_next(&hbi, true), <, 0);

    hbitmap_iter_init(&hbi, f->hb, (L2 + L1 + 2) << 7);
    g_assert_cmpint(hbitmap_iter_next(&hbi, true), ==, INT64_C(131071) << 7);
    g_assert_cmpint(hbitmap_iter_next(&hbi, true), <, 0);

    /* Starting inside a dirty group reports the group's first item, before `first`. */
    hbitmap_iter_init(&hbi, f->hb, ((L2 + L1 + 1) << 7) + 100);
    g_assert_cmpint(hbitmap_iter_next(&hbi, true), ==, (int64_t)((L2 + L1 + 1) << 7));
    fixture_check(f);
}

static void test_iter_no_advance(Fixture *f, gconstpointer data)
{
    HBitmapIter hbi;

    (void)data;
    fixture_init(f, L2, 0);
    fixture_set(f, 5, 1);
    fixture_set(f, 70, 1);
    hbitmap_iter_init(&hbi, f->hb, 0);
    g_assert_cmpint(hbitmap_iter_next(&hbi, false), ==, 5);
    g_assert_cmpint(hbitmap_iter_next(&hbi, false), ==, 5);
    g_assert_cmpint(hbitmap_iter_next(&hbi, true), ==, 5);
    g_assert_cmpint(hbitmap_iter_next(&hbi, false), ==, 70);
    g_assert_cmpint(hbitmap_iter_next(&hbi, true), ==, 70);
    g_assert_cmpint(hbitmap_iter_next(&hbi, false), ==, -1);
    g_assert_cmpint(hbitmap_iter_next(&hbi, true), ==, -1);
}

/* Groups cleaned after hbitmap_iter_init are not reported. */
static void test_iter_reset_ahead(Fixture *f, gconstpointer data)
{
    HBitmapIter hbi;

    (void)data;
    fixture_init(f, L3, 0);
    fixture_set(f, 10, 1);
    fixture_set(f, 100, 1);
    fixture_set(f, 12, 1);
    fixture_set(f, L2 * 3, 1);
    fixture_set(f, L3 - 1, 1);
    hbitmap_iter_init(&hbi, f->hb, 0);
    g_assert_cmpint(hbitmap_iter_next(&hbi, true), ==, 10);
    fixture_reset(f, 12, 1);                    /* same word as the current item */
    fixture_reset(f, 100, 1);                   /* next word */
    g_assert_cmpint(hbitmap_iter_next(&hbi, true), ==, (int64_t)(L2 * 3));
    fixture_reset(f, L3 - 1, 1);                /* another branch of the upper levels */
    g_assert_cmpint(hbitmap_iter_next(&hbi, true), ==, -1);
    fixture_check(f);
}

/* QEMU's test_hbitmap_iter_and_reset: reset_all in the middle of an iteration. */
static void test_iter_reset_all(Fixture *f, gconstpointer data)
{
    HBitmapIter hbi;

    (void)data;
    fixture_init(f, L1 * 2, 0);
    fixture_set(f, 0, L1 * 2);
    hbitmap_iter_init(&hbi, f->hb, L1 - 1);
    g_assert_cmpint(hbitmap_iter_next(&hbi, true), ==, (int64_t)(L1 - 1));
    fixture_reset_all(f);
    g_assert_cmpint(hbitmap_iter_next(&hbi, true), ==, -1);
    fixture_check(f);
}

/* Bitmap used by the word-iteration tests: bits in words 0, 3, 64 and 4095. */
static void set_word_pattern(Fixture *f)
{
    fixture_init(f, L3, 0);
    fixture_set(f, 0, 1);
    fixture_set(f, 5, 1);
    fixture_set(f, 63, 1);
    fixture_set(f, 3 * L1 + 1, 1);
    fixture_set(f, L2, 1);
    fixture_set(f, L3 - 1, 1);
}

#define BIT(n) (1UL << (n))

static void expect_next_word(HBitmapIter *hbi, size_t pos, unsigned long word)
{
    unsigned long cur = 0xdeadbeef;

    g_assert_cmpuint(hbitmap_iter_next_word(hbi, &cur), ==, pos);
    g_assert_cmphex(cur, ==, word);
}

static void test_iter_next_word(Fixture *f, gconstpointer data)
{
    HBitmapIter hbi;
    unsigned long cur;
    uint64_t bits = 0;
    size_t pos;

    (void)data;
    set_word_pattern(f);
    hbitmap_iter_init(&hbi, f->hb, 0);
    expect_next_word(&hbi, 0, BIT(0) | BIT(5) | BIT(63));
    expect_next_word(&hbi, 3, BIT(1));
    expect_next_word(&hbi, 64, BIT(0));
    expect_next_word(&hbi, 4095, BIT(63));
    expect_next_word(&hbi, (size_t)-1, 0);
    expect_next_word(&hbi, (size_t)-1, 0);

    /* From the middle of word 0: its bits before `first` are dropped. */
    hbitmap_iter_init(&hbi, f->hb, 6);
    expect_next_word(&hbi, 0, BIT(63));
    expect_next_word(&hbi, 3, BIT(1));
    hbitmap_iter_init(&hbi, f->hb, 3 * L1 + 2);
    expect_next_word(&hbi, 64, BIT(0));

    /* QEMU's hb_count_between: the popcount over all words is the count. */
    hbitmap_iter_init(&hbi, f->hb, 0);
    while ((pos = hbitmap_iter_next_word(&hbi, &cur)) != (size_t)-1) {
        bits += (uint64_t)__builtin_popcountl(cur);
    }
    g_assert_cmpuint(bits, ==, hbitmap_count(f->hb));
    g_assert_cmpuint(bits, ==, 6);
}

/* hbitmap_iter_next_word after hbitmap_iter_next resumes within the current word. */
static void test_iter_next_word_mixed(Fixture *f, gconstpointer data)
{
    HBitmapIter hbi;

    (void)data;
    set_word_pattern(f);
    hbitmap_iter_init(&hbi, f->hb, 0);
    g_assert_cmpint(hbitmap_iter_next(&hbi, true), ==, 0);
    expect_next_word(&hbi, 0, BIT(5) | BIT(63));
    g_assert_cmpint(hbitmap_iter_next(&hbi, true), ==, (int64_t)(3 * L1 + 1));
    expect_next_word(&hbi, 64, BIT(0));
    g_assert_cmpint(hbitmap_iter_next(&hbi, false), ==, (int64_t)(L3 - 1));
    expect_next_word(&hbi, 4095, BIT(63));
    g_assert_cmpint(hbitmap_iter_next(&hbi, true), ==, -1);
}

/* hbitmap_iter_skip_words moves past the current word to the next nonzero one. */
static void test_iter_skip_words(Fixture *f, gconstpointer data)
{
    HBitmapIter hbi;

    (void)data;
    set_word_pattern(f);
    hbitmap_iter_init(&hbi, f->hb, 0);
    g_assert_cmpuint(hbi.pos, ==, 0);
    g_assert_cmphex(hbi.cur[HBITMAP_LEVELS - 1], ==, BIT(0) | BIT(5) | BIT(63));
    g_assert_cmphex(hbitmap_iter_skip_words(&hbi), ==, BIT(1));
    g_assert_cmpuint(hbi.pos, ==, 3);
    g_assert_cmphex(hbitmap_iter_skip_words(&hbi), ==, BIT(0));
    g_assert_cmpuint(hbi.pos, ==, 64);
    g_assert_cmphex(hbitmap_iter_skip_words(&hbi), ==, BIT(63));
    g_assert_cmpuint(hbi.pos, ==, 4095);
    g_assert_cmphex(hbitmap_iter_skip_words(&hbi), ==, 0);
    g_assert_cmphex(hbitmap_iter_skip_words(&hbi), ==, 0);

    /* On an empty bitmap the first call ends the iteration. */
    fixture_reset_all(f);
    hbitmap_iter_init(&hbi, f->hb, L2);
    g_assert_cmphex(hbitmap_iter_skip_words(&hbi), ==, 0);
}

/* ---- get, set, reset --------------------------------------------------------------------- */

static void test_get_all(Fixture *f, gconstpointer data)
{
    (void)data;
    fixture_init(f, L3, 0);
    fixture_set(f, 0, L3);
    fixture_check(f);
    g_assert_cmpuint(hbitmap_count(f->hb), ==, L3);
}

static void test_get_some(Fixture *f, gconstpointer data)
{
    (void)data;
    fixture_init(f, L3, 0);
    fixture_set(f, 2 * L1, 1);
    fixture_check(f);
    fixture_set(f, L2, 1);
    fixture_check(f);
    fixture_set(f, L3 - 1, 1);
    fixture_check(f);
    g_assert_true(hbitmap_get(f->hb, 2 * L1));
    g_assert_false(hbitmap_get(f->hb, 2 * L1 + 1));
    g_assert_false(hbitmap_get(f->hb, 2 * L1 - 1));
    g_assert_cmpuint(hbitmap_count(f->hb), ==, 3);
}

static void test_set_all(Fixture *f, gconstpointer data)
{
    (void)data;
    fixture_init(f, L3, 0);
    fixture_set(f, 0, L3);
    fixture_check(f);
}

static void test_set_one(Fixture *f, gconstpointer data)
{
    static const uint64_t items[] = { 0, L3 - 1, L3 - L1 - 1, L3 - L1, L2 - 1, L2 };

    (void)data;
    fixture_init(f, L3, 0);
    for (size_t i = 0; i < G_N_ELEMENTS(items); i++) {
        fixture_set(f, items[i], 1);
        fixture_check(f);
        g_assert_cmpuint(hbitmap_count(f->hb), ==, i + 1);
    }
}

static void test_set_two_elem(Fixture *f, gconstpointer data)
{
    (void)data;
    fixture_init(f, L2, 0);
    fixture_set(f, L1 - 1, 2);
    fixture_check(f);
    fixture_set(f, L1 * 2 - 1, 4);
    fixture_check(f);
    fixture_set(f, L1 * 4, L1 + 1);
    fixture_check(f);
    fixture_set(f, L1 * 8 - 1, L1 + 2);
    fixture_check(f);
    fixture_set(f, L2 - L1, L1);
    fixture_check(f);
    g_assert_cmpuint(hbitmap_count(f->hb), ==, 2 + 4 + L1 + 1 + L1 + 2 + L1);
}

static void test_set_general(Fixture *f, gconstpointer data)
{
    static const uint64_t ranges[][2] = {
        { 0, 1 }, { L3 - 1, 1 }, { L1 - 1, 2 }, { L1 * 2 - 1, L1 * 2 + 2 },
        { L1 * 5, L1 * 4 + 1 }, { L1 * 12 - 1, L1 * 8 + 1 }, { L2 - 1, 2 },
        { L2 * 2 - 1, L2 + 2 }, { L2 * 4, L2 * 4 + 1 }, { L2 * 10 - 1, L2 * 8 + 1 },
        { L3 - L2, L2 },
    };

    (void)data;
    fixture_init(f, L3, 0);
    for (size_t i = 0; i < G_N_ELEMENTS(ranges); i++) {
        fixture_set(f, ranges[i][0], ranges[i][1]);
        fixture_check(f);
    }
}

static void test_set_twice(Fixture *f, gconstpointer data)
{
    (void)data;
    fixture_init(f, L1 * 3, 0);
    fixture_set(f, 0, L1 * 3);
    fixture_set(f, L1, 1);
    fixture_set(f, 0, L1 * 3);
    g_assert_cmpuint(hbitmap_count(f->hb), ==, L1 * 3);
    fixture_check(f);
}

static void test_set_overlap(Fixture *f, gconstpointer data)
{
    static const uint64_t ranges[][2] = {
        { L1 * 2, L1 + 1 }, { L1, L1 * 2 }, { 0, L1 * 3 }, { L1 * 4 - 1, L1 * 3 },
        { L1 * 5, L1 * 2 }, { L1 * 2 - 1, L1 * 8 }, { L2 - L1, L1 * 2 + 1 }, { L2 - 1, 3 },
    };

    (void)data;
    fixture_init(f, L2 * 2, 0);
    for (size_t i = 0; i < G_N_ELEMENTS(ranges); i++) {
        fixture_set(f, ranges[i][0], ranges[i][1]);
        fixture_check(f);
    }
}

static void test_set_zero_count(Fixture *f, gconstpointer data)
{
    (void)data;
    if (skip_on_original("the original asserts on count 0 (its last item wraps)")) {
        return;
    }
    fixture_init(f, L1, 0);
    hbitmap_set(f->hb, 0, 0);
    hbitmap_set(f->hb, L1 - 1, 0);
    hbitmap_reset(f->hb, 0, 0);
    fixture_check(f);
}

static void test_reset_empty(Fixture *f, gconstpointer data)
{
    (void)data;
    fixture_init(f, L3, 0);
    fixture_reset(f, 0, L3);
    fixture_check(f);
}

/* QEMU's test_hbitmap_reset: each range set then reset (or partly reset). */
static void test_reset_general(Fixture *f, gconstpointer data)
{
    static const uint64_t steps[][4] = {
        /* set start, count; reset start, count */
        { L1 - 1, L1 + 2, L1, 2 },
        { L1 * 3 - 1, L1 + 2, L1 * 3 - 1, L1 + 2 },
        { L1 * 4, L1 * 2 + 1, L1 * 4, L1 * 2 + 1 },
        { L1 * 7, L1 * 2, L1 * 8, L1 },
        { L2 - 1, 2, L2 - 1, 2 },
        { L2 * 2 - 1, L2 + 2, L2 * 2 - 1, L2 + 2 },
        { L2 * 4, L2 * 2 + 1, L2 * 4, L2 * 2 + 1 },
        { L2 * 7, L2 * 2, L2 * 8, L2 },
        { L3 - L2, L2, L3 - L2, L2 },
        { L3 - 1, 1, L3 - 1, 1 },
    };

    (void)data;
    fixture_init(f, L3, 0);
    for (size_t i = 0; i < G_N_ELEMENTS(steps); i++) {
        fixture_set(f, steps[i][0], steps[i][1]);
        fixture_check(f);
        fixture_reset(f, steps[i][2], steps[i][3]);
        fixture_check(f);
    }
    /* What is left: L1 - 1, L1 + 2 .. 2 * L1, L1 * 7 .. L1 * 8 - 1, L2 * 7 .. L2 * 8 - 1 */
    g_assert_cmpuint(hbitmap_count(f->hb), ==, 1 + (L1 - 1) + L1 + L2);
}

static void test_reset_all(Fixture *f, gconstpointer data)
{
    (void)data;
    fixture_init(f, L3, 0);
    fixture_set(f, L1 - 1, L1 + 2);
    fixture_reset_all(f);
    fixture_check(f);
    fixture_set(f, L2, L1);
    fixture_set(f, L3 - 1, 1);
    fixture_reset_all(f);
    fixture_check(f);
    /* Usable again afterwards. */
    fixture_set(f, L2 * 3 + 7, 3);
    fixture_check(f);
    EXPECT_ITER(f->hb, 0, (int64_t)(L2 * 3 + 7), (int64_t)(L2 * 3 + 8), (int64_t)(L2 * 3 + 9));
}

/* An unaligned size: the last item, and ranges ending on it. */
static void test_size_unaligned(Fixture *f, gconstpointer data)
{
    (void)data;
    fixture_init(f, L3 + 23, 0);
    fixture_set(f, L3 + 22, 1);
    fixture_check(f);
    fixture_set(f, L3 - 5, 28);
    fixture_check(f);
    fixture_reset(f, L3, 23);
    fixture_check(f);
    g_assert_cmpuint(hbitmap_count(f->hb), ==, 5);
    g_assert_cmpint(hbitmap_next_zero(f->hb, L3 - 5, 100), ==, (int64_t)L3);
}

/* Random sets and resets against the shadow (reproducible with --seed). */
static void test_random(Fixture *f, gconstpointer data)
{
    int granularity = GPOINTER_TO_INT(data);
    uint64_t size = L2 * 3 + 17;

    fixture_init(f, size, granularity);
    for (int op = 0; op < 300; op++) {
        uint64_t start = (uint64_t)g_test_rand_int_range(0, (gint32)size);
        uint64_t longest = g_test_rand_bit() ? L1 * 3 : L2 * 2;
        uint64_t max = MIN(size - start, longest);
        uint64_t count = (uint64_t)g_test_rand_int_range(1, (gint32)max + 1);
        int kind = g_test_rand_int_range(0, 20);

        if (kind == 0) {
            fixture_reset_all(f);
        } else if (kind < 12) {
            fixture_set(f, start, count);
        } else {
            fixture_reset(f, start, count);
        }
        if (op % 10 == 0) {
            fixture_check(f);
            check_next_zero(f, start, count);
            check_next_dirty_area(f, start, count);
        }
    }
    fixture_check(f);
}

/* ---- truncate ---------------------------------------------------------------------------- */

typedef struct {
    uint64_t size;
    int64_t diff;
    int granularity;
} TruncateCase;

/* QEMU's test_hbitmap_truncate_*: shrink or grow, check, go back, check the groups that came
 * back are clean, fill, resize again. */
static void test_truncate(Fixture *f, gconstpointer data)
{
    const TruncateCase *c = data;
    uint64_t size = c->size, new_size = (uint64_t)((int64_t)c->size + c->diff);

    fixture_init(f, size, c->granularity);
    fixture_set(f, 0, 1);
    fixture_set(f, size / 2, 1);
    fixture_set(f, size - 1, 1);
    if (new_size > 0 && new_size <= size) {
        fixture_set(f, new_size - 1, 1);
    }
    if (new_size < size) {
        fixture_set(f, new_size, 1);
    }
    fixture_check(f);

    fixture_truncate(f, new_size);
    fixture_check(f);
    fixture_truncate(f, size);
    fixture_check(f);

    fixture_set(f, 0, size);
    fixture_check(f);
    fixture_truncate(f, new_size);
    fixture_check(f);
    g_assert_cmpuint(hbitmap_count(f->hb), ==,
                     MIN(groups_for(size, c->granularity), groups_for(new_size, c->granularity))
                         << c->granularity);
    if (new_size > 0) {
        fixture_set(f, new_size - 1, 1);
        fixture_reset(f, 0, new_size);
        fixture_check(f);
    }
}

/* Since QEMU 4.1 (4e4de22279) truncate also moves the end that next_zero and
 * next_dirty_area see; the original kept the size given to hbitmap_alloc. */
static void test_truncate_moves_end(Fixture *f, gconstpointer data)
{
    uint64_t start = 100, count = 100;

    (void)data;
    if (skip_on_original("the original does not update its size on truncate")) {
        return;
    }
    fixture_init(f, 100, 0);
    fixture_truncate(f, 200);
    fixture_set(f, 150, 10);
    g_assert_cmpint(hbitmap_next_zero(f->hb, 150, 50), ==, 160);
    g_assert_true(hbitmap_next_dirty_area(f->hb, &start, &count));
    g_assert_cmpuint(start, ==, 150);
    g_assert_cmpuint(count, ==, 10);
    check_next_zero(f, 120, 1000);
    check_next_dirty_area(f, 0, UINT64_MAX);

    fixture_set(f, 0, 200);
    fixture_truncate(f, 100);
    start = 50;
    count = 1000;
    g_assert_true(hbitmap_next_dirty_area(f->hb, &start, &count));
    g_assert_cmpuint(start, ==, 50);
    g_assert_cmpuint(count, ==, 50);
    g_assert_cmpint(hbitmap_next_zero(f->hb, 0, 1000), ==, -1);
    g_assert_cmpint(hbitmap_next_zero(f->hb, 100, 1), ==, -1);
}

/* ---- merge ------------------------------------------------------------------------------- */

static void test_merge_basic(void)
{
    HBitmap *a = hbitmap_alloc(L2, 0), *b = hbitmap_alloc(L2, 0), *r = hbitmap_alloc(L2, 0);

    hbitmap_set(a, 0, 10);
    hbitmap_set(a, L1 * 3, 5);
    hbitmap_set(b, 5, 10);
    hbitmap_set(b, L2 - 1, 1);
    hbitmap_set(r, 1000, 1);                    /* overwritten */
    g_assert_true(hbitmap_can_merge(a, b));
    g_assert_true(hbitmap_merge(a, b, r));
    g_assert_cmpuint(hbitmap_count(r), ==, 15 + 5 + 1);
    EXPECT_ITER(r, L1 * 3 - 1, (int64_t)(L1 * 3), (int64_t)(L1 * 3 + 1), (int64_t)(L1 * 3 + 2),
                (int64_t)(L1 * 3 + 3), (int64_t)(L1 * 3 + 4), (int64_t)(L2 - 1));
    g_assert_true(hbitmap_get(r, 0));
    g_assert_true(hbitmap_get(r, 14));
    g_assert_false(hbitmap_get(r, 15));
    g_assert_false(hbitmap_get(r, 1000));
    /* a and b unchanged */
    g_assert_cmpuint(hbitmap_count(a), ==, 15);
    g_assert_cmpuint(hbitmap_count(b), ==, 11);
    g_assert_false(hbitmap_get(a, 12));

    /* Into one of the inputs, and a bitmap with itself. */
    g_assert_true(hbitmap_merge(a, b, a));
    g_assert_cmpuint(hbitmap_count(a), ==, 21);
    g_assert_true(hbitmap_get(a, 12));
    g_assert_true(hbitmap_merge(b, a, b));
    g_assert_cmpuint(hbitmap_count(b), ==, 21);
    g_assert_true(hbitmap_merge(a, a, a));
    g_assert_cmpuint(hbitmap_count(a), ==, 21);
    EXPECT_ITER(a, L1 * 3 + 3, (int64_t)(L1 * 3 + 3), (int64_t)(L1 * 3 + 4), (int64_t)(L2 - 1));
    hbitmap_free(a);
    hbitmap_free(b);
    hbitmap_free(r);
}

/* result = a | b even when b is empty (the original returned early, leaving result as it
 * was); with granularity, group sizes count. */
static void test_merge_empty(void)
{
    HBitmap *a, *b, *r;

    if (skip_on_original("the original leaves result untouched when b is empty")) {
        return;
    }
    a = hbitmap_alloc(L2, 2);
    b = hbitmap_alloc(L2, 2);
    r = hbitmap_alloc(L2, 2);
    hbitmap_set(a, 9, 1);
    hbitmap_set(r, 1000, 1);
    g_assert_true(hbitmap_merge(a, b, r));
    EXPECT_ITER(r, 0, 8);
    g_assert_cmpuint(hbitmap_count(r), ==, 4);
    hbitmap_reset_all(a);
    g_assert_true(hbitmap_merge(a, b, r));
    g_assert_true(hbitmap_empty(r));
    hbitmap_free(a);
    hbitmap_free(b);
    hbitmap_free(r);
}

static void test_merge_mismatch(void)
{
    HBitmap *a = hbitmap_alloc(L2, 0);
    HBitmap *bigger = hbitmap_alloc(L2 + L1, 0);
    HBitmap *coarser = hbitmap_alloc(L2, 1);
    HBitmap *g3a = hbitmap_alloc(60, 3), *g3b = hbitmap_alloc(64, 3);

    hbitmap_set(a, 7, 1);
    hbitmap_set(bigger, 9, 1);
    hbitmap_set(coarser, 11, 1);
    g_assert_false(hbitmap_can_merge(a, bigger));
    g_assert_false(hbitmap_can_merge(a, coarser));
    g_assert_false(hbitmap_merge(a, bigger, a));
    g_assert_false(hbitmap_merge(a, coarser, a));
    g_assert_false(hbitmap_merge(a, a, bigger));
    EXPECT_ITER(a, 0, 7);
    EXPECT_ITER(bigger, 0, 9);
    /* The same number of groups is enough: 60 and 64 items are 8 groups of 8. */
    g_assert_true(hbitmap_can_merge(g3a, g3b));
    hbitmap_set(g3b, 63, 1);
    g_assert_true(hbitmap_merge(g3a, g3b, g3a));
    EXPECT_ITER(g3a, 0, 56);
    hbitmap_free(a);
    hbitmap_free(bigger);
    hbitmap_free(coarser);
    hbitmap_free(g3a);
    hbitmap_free(g3b);
}

/* ---- meta bitmaps ------------------------------------------------------------------------ */

static void fixture_init_meta(Fixture *f, uint64_t size, int granularity, int chunk_size)
{
    fixture_init(f, size, granularity);
    f->meta = hbitmap_create_meta(f->hb, chunk_size);
    g_assert_nonnull(f->meta);
    g_assert_cmpint(hbitmap_granularity(f->meta), ==,
                    granularity + __builtin_ctz((unsigned)chunk_size));
    g_assert_true(hbitmap_empty(f->meta));
}

/* The meta bitmap's items [start, start + count) are dirty, the others clean; start and
 * count are multiples of the meta bitmap's group size, checked by its first and last item. */
static void check_meta(const Fixture *f, uint64_t start, uint64_t count)
{
    uint64_t group = UINT64_C(1) << hbitmap_granularity(f->meta);

    for (uint64_t i = 0; i < f->size; i += group) {
        bool dirty = i >= start && i < start + count;

        g_assert_cmpint(hbitmap_get(f->meta, i), ==, dirty);
        g_assert_cmpint(hbitmap_get(f->meta, i + group - 1), ==, dirty);
    }
    g_assert_cmpuint(hbitmap_count(f->meta), ==, count);
}

/* QEMU's hbitmap_test_meta. */
static void test_meta_range(Fixture *f, uint64_t start, uint64_t count,
                            uint64_t check_start, uint64_t check_count)
{
    hbitmap_reset_all(f->hb);
    hbitmap_reset_all(f->meta);

    /* clean -> clean: no change */
    hbitmap_reset(f->hb, start, count);
    g_assert_cmpuint(hbitmap_count(f->meta), ==, 0);

    /* clean -> dirty marks the meta bitmap */
    hbitmap_set(f->hb, start, count);
    check_meta(f, check_start, check_count);

    /* dirty -> dirty: no change */
    hbitmap_reset_all(f->meta);
    hbitmap_set(f->hb, start, count);
    g_assert_cmpuint(hbitmap_count(f->meta), ==, 0);

    /* dirty -> clean marks it */
    hbitmap_reset_all(f->meta);
    hbitmap_reset(f->hb, start, count);
    check_meta(f, check_start, check_count);
}

static void test_meta_chunk(Fixture *f, gconstpointer data)
{
    uint64_t chunk = (uint64_t)GPOINTER_TO_INT(data);
    uint64_t size = chunk * 100;

    fixture_init_meta(f, size, 0, (int)chunk);
    test_meta_range(f, 0, 1, 0, chunk);
    test_meta_range(f, 0, chunk, 0, chunk);
    test_meta_range(f, chunk - 1, 1, 0, chunk);
    test_meta_range(f, chunk - 1, 2, 0, chunk * 2);
    test_meta_range(f, chunk - 1, chunk + 1, 0, chunk * 2);
    test_meta_range(f, chunk - 1, chunk + 2, 0, chunk * 3);
    test_meta_range(f, 7 * chunk - 1, chunk + 2, 6 * chunk, chunk * 3);
    test_meta_range(f, size - 1, 1, size - chunk, chunk);
    test_meta_range(f, 0, size, 0, size);
}

static void test_meta_zero(Fixture *f, gconstpointer data)
{
    (void)data;
    fixture_init_meta(f, 0, 0, 1);
    g_assert_cmpuint(hbitmap_count(f->meta), ==, 0);
    check_meta(f, 0, 0);
}

/* Clearing one bit of a word that stays nonzero does not mark the meta bitmap; reset_all
 * never does; freeing and re-creating works. */
static void test_meta_word_rule(Fixture *f, gconstpointer data)
{
    (void)data;
    fixture_init_meta(f, L2, 0, 1);
    hbitmap_set(f->hb, 3, 2);
    g_assert_cmpuint(hbitmap_count(f->meta), ==, 2);
    hbitmap_reset_all(f->meta);
    hbitmap_reset(f->hb, 3, 1);                 /* word 0 still has item 4 */
    g_assert_true(hbitmap_empty(f->meta));
    hbitmap_reset(f->hb, 4, 1);                 /* word 0 becomes clean */
    EXPECT_ITER(f->meta, 0, 4);
    hbitmap_reset_all(f->meta);
    hbitmap_set(f->hb, 0, L2);
    hbitmap_reset_all(f->meta);
    hbitmap_reset_all(f->hb);
    g_assert_true(hbitmap_empty(f->meta));

    hbitmap_free_meta(f->hb);
    f->meta = hbitmap_create_meta(f->hb, 64);
    g_assert_cmpint(hbitmap_granularity(f->meta), ==, 6);
    hbitmap_set(f->hb, 130, 1);
    EXPECT_ITER(f->meta, 0, 128);
    g_assert_cmpuint(hbitmap_count(f->meta), ==, 64);
}

static void test_meta_granularity(Fixture *f, gconstpointer data)
{
    (void)data;
    fixture_init_meta(f, 1000, 2, 16);          /* meta groups of 64 items */
    hbitmap_set(f->hb, 70, 1);
    EXPECT_ITER(f->meta, 0, 64);
    g_assert_cmpuint(hbitmap_count(f->meta), ==, 64);
    hbitmap_set(f->hb, 999, 1);
    EXPECT_ITER(f->meta, 0, 64, 960);
}

/* The meta bitmap follows truncate. */
static void test_meta_truncate(Fixture *f, gconstpointer data)
{
    (void)data;
    fixture_init_meta(f, 1000, 0, 64);
    fixture_truncate(f, 2000);
    hbitmap_set(f->hb, 1990, 1);
    EXPECT_ITER(f->meta, 0, 1984);
    g_assert_true(hbitmap_get(f->meta, 1999));
    hbitmap_reset_all(f->meta);
    fixture_truncate(f, 500);
    hbitmap_set(f->hb, 499, 1);
    EXPECT_ITER(f->meta, 0, 448);
    g_assert_true(hbitmap_get(f->meta, 499));
}

/* ---- serialization ----------------------------------------------------------------------- */

static void test_serialize_align(void)
{
    static const int grans[] = { 0, 1, 3, 9, 20, 57 };

    for (size_t i = 0; i < G_N_ELEMENTS(grans); i++) {
        HBitmap *hb = hbitmap_alloc(L3, grans[i]);

        g_assert_true(hbitmap_is_serializable(hb));
        g_assert_cmpuint(hbitmap_serialization_align(hb), ==, UINT64_C(64) << grans[i]);
        hbitmap_free(hb);
    }
    for (int g = 58; g < 64; g++) {
        HBitmap *hb = hbitmap_alloc(L3, g);

        g_assert_false(hbitmap_is_serializable(hb));
        hbitmap_free(hb);
    }
}

static void test_serialize_size(void)
{
    HBitmap *hb = hbitmap_alloc(L3, 0), *odd = hbitmap_alloc(100, 0), *g3 = hbitmap_alloc(1000, 3);

    g_assert_cmpuint(hbitmap_serialization_size(hb, 0, L3), ==, L3 / 8);
    g_assert_cmpuint(hbitmap_serialization_size(hb, 0, 64), ==, 8);
    g_assert_cmpuint(hbitmap_serialization_size(hb, 64, 128), ==, 16);
    g_assert_cmpuint(hbitmap_serialization_size(hb, L3 - 64, 64), ==, 8);
    g_assert_cmpuint(hbitmap_serialization_size(hb, 128, 0), ==, 0);
    g_assert_cmpuint(hbitmap_serialization_size(hb, L3 - 128, 128), ==, 16);
    /* The last chunk may end anywhere. */
    g_assert_cmpuint(hbitmap_serialization_size(odd, 0, 100), ==, 16);
    g_assert_cmpuint(hbitmap_serialization_size(odd, 64, 36), ==, 8);
    /* Granularity 3: 125 groups in 2 words; chunks are aligned to 512 items. */
    g_assert_cmpuint(hbitmap_serialization_size(g3, 0, 1000), ==, 16);
    g_assert_cmpuint(hbitmap_serialization_size(g3, 0, 512), ==, 8);
    g_assert_cmpuint(hbitmap_serialization_size(g3, 512, 488), ==, 8);
    hbitmap_free(hb);
    hbitmap_free(odd);
    hbitmap_free(g3);
}

static bool test_bit_le(const uint8_t *buf, uint64_t bit)
{
    return (buf[bit / 8] >> (bit % 8)) & 1;
}

/* QEMU's hbitmap_test_serialize_range: one dirty range, serialized whole, checked bit by bit,
 * deserialized back. */
static void serialize_range(Fixture *f, uint8_t *buf, size_t buf_size, uint64_t pos,
                            uint64_t count)
{
    uint8_t *again = g_malloc0(buf_size);

    hbitmap_reset_all(f->hb);
    memset(buf, 0, buf_size);
    if (count) {
        hbitmap_set(f->hb, pos, count);
    }
    hbitmap_serialize_part(f->hb, buf, 0, f->size);
    for (uint64_t i = 0; i < f->size; i++) {
        g_assert_cmpint(test_bit_le(buf, i), ==, i >= pos && i < pos + count);
    }

    hbitmap_reset_all(f->hb);
    hbitmap_deserialize_part(f->hb, buf, 0, f->size, true);
    g_assert_cmpuint(hbitmap_count(f->hb), ==, count);
    if (count) {
        HBitmapIter hbi;

        hbitmap_iter_init(&hbi, f->hb, 0);
        g_assert_cmpint(hbitmap_iter_next(&hbi, true), ==, (int64_t)pos);
        g_assert_cmpint(hbitmap_next_zero(f->hb, pos, f->size - pos), ==,
                        pos + count == f->size ? -1 : (int64_t)(pos + count));
    }
    hbitmap_serialize_part(f->hb, again, 0, f->size);
    g_assert_cmpmem(again, buf_size, buf, buf_size);
    g_free(again);
}

static void test_serialize_basic(Fixture *f, gconstpointer data)
{
    static const uint64_t positions[] = { 0, 1, L1 - 1, L1, L2 - 1, L2, L2 + 1, L3 - 1 };
    size_t buf_size;
    uint8_t *buf;

    (void)data;
    fixture_init(f, L3, 0);
    g_assert_true(hbitmap_is_serializable(f->hb));
    buf_size = hbitmap_serialization_size(f->hb, 0, f->size);
    g_assert_cmpuint(buf_size, ==, L3 / 8);
    buf = g_malloc0(buf_size);
    for (size_t i = 0; i < G_N_ELEMENTS(positions); i++) {
        for (size_t j = 0; j < G_N_ELEMENTS(positions); j++) {
            serialize_range(f, buf, buf_size, positions[i], MIN(positions[j], L3 - positions[i]));
        }
    }
    g_free(buf);
}

/* QEMU's test_hbitmap_serialize_part: serialization in chunks of L2 items. */
static void test_serialize_part(Fixture *f, gconstpointer data)
{
    static const uint64_t positions[] = { 0, 1, L1 - 1, L1, L2 - 1, L2, L2 + 1, L3 - 1 };
    const uint64_t chunk = L2;
    uint8_t *buf = g_malloc0(chunk / 8);
    HBitmap *copy = hbitmap_alloc(L3, 0);

    (void)data;
    fixture_init(f, L3, 0);
    for (size_t i = 0; i < G_N_ELEMENTS(positions); i++) {
        hbitmap_set(f->hb, positions[i], 1);
    }
    g_assert_cmpuint(hbitmap_serialization_align(f->hb), ==, 64);
    for (uint64_t start = 0; start < f->size; start += chunk) {
        g_assert_cmpuint(hbitmap_serialization_size(f->hb, start, chunk), ==, chunk / 8);
        hbitmap_serialize_part(f->hb, buf, start, chunk);
        for (uint64_t j = 0; j < chunk; j++) {
            bool should_set = false;

            for (size_t k = 0; k < G_N_ELEMENTS(positions); k++) {
                should_set |= positions[k] == start + j;
            }
            g_assert_cmpint(test_bit_le(buf, j), ==, should_set);
        }
        /* Chunks loaded with finish=false, summary levels rebuilt once at the end. */
        hbitmap_deserialize_part(copy, buf, start, chunk, false);
    }
    hbitmap_deserialize_finish(copy);
    g_assert_cmpuint(hbitmap_count(copy), ==, G_N_ELEMENTS(positions));
    EXPECT_ITER(copy, 0, 0, 1, (int64_t)(L1 - 1), (int64_t)L1, (int64_t)(L2 - 1), (int64_t)L2,
                (int64_t)(L2 + 1), (int64_t)(L3 - 1));
    hbitmap_free(copy);
    g_free(buf);
}

/* QEMU's test_hbitmap_serialize_zeroes. */
static void test_serialize_zeroes(Fixture *f, gconstpointer data)
{
    static const uint64_t positions[] = { 0, L1, L2, L3 - L1 };

    (void)data;
    fixture_init(f, L3, 0);
    for (size_t i = 0; i < G_N_ELEMENTS(positions); i++) {
        fixture_set(f, positions[i], L1);
    }
    for (size_t i = 0; i < G_N_ELEMENTS(positions); i++) {
        HBitmapIter hbi;

        hbitmap_deserialize_zeroes(f->hb, positions[i], L1, true);
        shadow_mark(f, positions[i], L1, 0);
        hbitmap_iter_init(&hbi, f->hb, 0);
        g_assert_cmpint(hbitmap_iter_next(&hbi, true), ==,
                        i + 1 == G_N_ELEMENTS(positions) ? -1 : (int64_t)positions[i + 1]);
        fixture_check(f);
    }
}

static void test_serialize_ones(Fixture *f, gconstpointer data)
{
    (void)data;
    fixture_init(f, L2 + 10, 0);
    hbitmap_deserialize_ones(f->hb, L1 * 2, L1, true);
    shadow_mark(f, L1 * 2, L1, 1);
    fixture_check(f);
    g_assert_cmpuint(hbitmap_count(f->hb), ==, L1);

    /* Several steps with finish=false, then hbitmap_deserialize_finish. */
    hbitmap_deserialize_ones(f->hb, L1 * 8, L1 * 2, false);
    hbitmap_deserialize_zeroes(f->hb, L1 * 2, L1, false);
    hbitmap_deserialize_finish(f->hb);
    shadow_mark(f, L1 * 8, L1 * 2, 1);
    shadow_mark(f, L1 * 2, L1, 0);
    fixture_check(f);
    g_assert_cmpuint(hbitmap_count(f->hb), ==, L1 * 2);
    /* Count 0 is a no-op, whatever the alignment. */
    hbitmap_deserialize_ones(f->hb, 3, 0, true);
    hbitmap_deserialize_zeroes(f->hb, 5, 0, true);
    hbitmap_deserialize_part(f->hb, NULL, 7, 0, true);
    hbitmap_serialize_part(f->hb, NULL, 9, 0);
    fixture_check(f);

    /* The last, partial chunk: the whole word is written (bits past the end included), the
     * count and the searches stop at the size. */
    hbitmap_deserialize_ones(f->hb, L2, 10, true);
    g_assert_cmpuint(hbitmap_count(f->hb), ==, L1 * 2 + 10);
    g_assert_true(hbitmap_get(f->hb, L2 + 9));
    expect_dirty_area_at(f->hb, L2 - 1, UINT64_MAX, L2, 10);
}

/* The format: little-endian 64-bit words of the last level, whatever the host. */
static void test_serialize_little_endian(void)
{
    HBitmap *hb = hbitmap_alloc(128, 0), *g3 = hbitmap_alloc(1000, 3);
    uint8_t buf[16], expected[16] = { 0x01, 0x02, [15] = 0x80 };
    uint8_t input[16] = { 0xff, [8] = 0x01, [13] = 0x10 };

    hbitmap_set(hb, 0, 1);
    hbitmap_set(hb, 9, 1);
    hbitmap_set(hb, 127, 1);
    hbitmap_serialize_part(hb, buf, 0, 128);
    g_assert_cmpmem(buf, sizeof(buf), expected, sizeof(expected));

    hbitmap_deserialize_part(hb, input, 0, 128, true);
    g_assert_cmpuint(hbitmap_count(hb), ==, 10);
    EXPECT_ITER(hb, 0, 0, 1, 2, 3, 4, 5, 6, 7, 64, 108);

    /* Granularity 3: a bit per 8 items. */
    hbitmap_set(g3, 8, 1);
    hbitmap_set(g3, 999, 1);                    /* group 124: word 1, bit 60 */
    hbitmap_serialize_part(g3, buf, 0, 1000);
    g_assert_cmphex(buf[0], ==, 0x02);
    g_assert_cmphex(buf[15], ==, 0x10);
    hbitmap_free(hb);
    hbitmap_free(g3);
}

/* ---- sha256 ------------------------------------------------------------------------------ */

static void test_sha256_known(void)
{
    HBitmap *hb = hbitmap_alloc(128, 0);
    char *digest;

    digest = hbitmap_sha256(hb, NULL);          /* 16 zero bytes */
    g_assert_cmpstr(digest, ==, "374708fff7719dd5979ec875d56cd2286f6d3cf7ec317a3b25632aab28ec37bb");
    free(digest);                               /* plain free() */

    hbitmap_set(hb, 0, 1);
    hbitmap_set(hb, 127, 1);
    digest = hbitmap_sha256(hb, NULL);          /* 01 00 .. 00 | 00 .. 00 80 */
    g_assert_cmpstr(digest, ==, "8bfd453c13278f5fe3040b806e4234aa6aea3377f3abf6ca19ab74dad908b7ae");
    g_free(digest);                             /* g_free() */
    hbitmap_free(hb);
}

/* The digest is that of the serialized bitmap (the last level, little-endian). */
static void test_sha256_serialization(void)
{
    static const int grans[] = { 0, 2, 9 };

    for (size_t i = 0; i < G_N_ELEMENTS(grans); i++) {
        HBitmap *hb = hbitmap_alloc(L3 + 77, grans[i]);
        Error *err = NULL;
        uint64_t size;
        uint8_t *buf;
        gchar *expected;
        char *digest;

        for (uint64_t item = 5; item < L3; item += 4099) {
            hbitmap_set(hb, item, item % 7 + 1);
        }
        size = hbitmap_serialization_size(hb, 0, L3 + 77);
        buf = g_malloc(size);
        hbitmap_serialize_part(hb, buf, 0, L3 + 77);
        expected = g_compute_checksum_for_data(G_CHECKSUM_SHA256, buf, size);
        digest = hbitmap_sha256(hb, &err);
        g_assert_null(err);
        g_assert_cmpstr(digest, ==, expected);
        free(digest);
        g_free(expected);
        g_free(buf);
        hbitmap_free(hb);
    }
}

/* ---- next_zero and next_dirty_area ------------------------------------------------------- */

/* QEMU's test_hbitmap_next_zero_do. */
static void test_next_zero(Fixture *f, gconstpointer data)
{
    int granularity = GPOINTER_TO_INT(data);

    fixture_init(f, L3, granularity);
    check_next_zero(f, 0, L3);
    check_next_zero(f, L3 - 1, 1);
    check_next_zero(f, 0, 1);

    fixture_set(f, L2, 1);
    check_next_zero(f, 0, UINT64_MAX);
    check_next_zero(f, L2 - 1, UINT64_MAX);
    check_next_zero(f, L2, UINT64_MAX);
    check_next_zero(f, L2 + 1, UINT64_MAX);
    check_next_zero(f, 0, 1);
    check_next_zero(f, 0, L2);
    check_next_zero(f, L2 - 1, 1);
    check_next_zero(f, L2 - 1, 2);
    check_next_zero(f, L2, 1);
    check_next_zero(f, L2 + 1, 1);

    fixture_set(f, L2 + 5, L1);
    check_next_zero(f, 0, UINT64_MAX);
    check_next_zero(f, L2 + 1, UINT64_MAX);
    check_next_zero(f, L2 + 2, L1);
    check_next_zero(f, L2 + 2, L1 + 3);
    check_next_zero(f, L2 + 5, L1 - 1);
    check_next_zero(f, L2 + 5, L1);
    check_next_zero(f, L2 + 5 + L1 - 1, UINT64_MAX);
    check_next_zero(f, L2 + 5 + L1, UINT64_MAX);
    check_next_zero(f, L2 * 2 - L1, L1 + 1);

    fixture_set(f, L2 * 2, L3 - L2 * 2);
    check_next_zero(f, L2 * 2 - L1, UINT64_MAX);
    check_next_zero(f, L2 * 2 - 1, UINT64_MAX);
    check_next_zero(f, L2 * 2, UINT64_MAX);
    check_next_zero(f, L3 - 1, UINT64_MAX);
    check_next_zero(f, L2 * 2 - 1, 2);

    fixture_set(f, 0, L3);
    check_next_zero(f, 0, UINT64_MAX);
    check_next_zero(f, L3 - 1, 1);
}

static void test_next_zero_explicit(Fixture *f, gconstpointer data)
{
    (void)data;
    fixture_init(f, 100, 0);
    fixture_set(f, 10, 20);
    g_assert_cmpint(hbitmap_next_zero(f->hb, 0, 100), ==, 0);
    g_assert_cmpint(hbitmap_next_zero(f->hb, 10, 90), ==, 30);
    g_assert_cmpint(hbitmap_next_zero(f->hb, 10, 20), ==, -1);
    g_assert_cmpint(hbitmap_next_zero(f->hb, 10, 21), ==, 30);
    g_assert_cmpint(hbitmap_next_zero(f->hb, 15, 5), ==, -1);
    g_assert_cmpint(hbitmap_next_zero(f->hb, 99, 1), ==, 99);
    g_assert_cmpint(hbitmap_next_zero(f->hb, 0, 0), ==, -1);
    g_assert_cmpint(hbitmap_next_zero(f->hb, 100, 1), ==, -1);
    if (!testing_original) {
        /* far past the end (the original read past its array first) */
        g_assert_cmpint(hbitmap_next_zero(f->hb, 100000, 1), ==, -1);
    }
    hbitmap_free(f->hb);
    g_free(f->shadow);

    fixture_init(f, 100, 3);
    fixture_set(f, 10, 20);                     /* groups 1..3: items 8..31 */
    g_assert_cmpint(hbitmap_next_zero(f->hb, 9, 50), ==, 32);
    g_assert_cmpint(hbitmap_next_zero(f->hb, 12, 2), ==, -1);
    g_assert_cmpint(hbitmap_next_zero(f->hb, 7, 5), ==, 7);
    g_assert_cmpint(hbitmap_next_zero(f->hb, 33, 10), ==, 33);
    fixture_set(f, 32, 68);
    g_assert_cmpint(hbitmap_next_zero(f->hb, 9, UINT64_MAX), ==, -1);
    g_assert_cmpint(hbitmap_next_zero(f->hb, 0, UINT64_MAX), ==, 0);
}

/* QEMU's test_hbitmap_next_dirty_area_do. */
static void test_next_dirty_area(Fixture *f, gconstpointer data)
{
    int granularity = GPOINTER_TO_INT(data);

    fixture_init(f, L3, granularity);
    check_next_dirty_area(f, 0, UINT64_MAX);
    check_next_dirty_area(f, 0, 1);
    check_next_dirty_area(f, L3 - 1, 1);

    fixture_set(f, L2, 1);
    check_next_dirty_area(f, 0, 1);
    check_next_dirty_area(f, 0, L2);
    check_next_dirty_area(f, 0, UINT64_MAX);
    check_next_dirty_area(f, L2 - 1, UINT64_MAX);
    check_next_dirty_area(f, L2 - 1, 1);
    check_next_dirty_area(f, L2 - 1, 2);
    check_next_dirty_area(f, L2 - 1, 3);
    check_next_dirty_area(f, L2, UINT64_MAX);
    check_next_dirty_area(f, L2, 1);
    check_next_dirty_area(f, L2 + 1, 1);

    fixture_set(f, L2 + 5, L1);
    check_next_dirty_area(f, 0, UINT64_MAX);
    check_next_dirty_area(f, L2 - 2, 8);
    check_next_dirty_area(f, L2 + 1, 5);
    check_next_dirty_area(f, L2 + 1, 3);
    check_next_dirty_area(f, L2 + 4, L1);
    check_next_dirty_area(f, L2 + 5, L1);
    check_next_dirty_area(f, L2 + 7, L1);
    check_next_dirty_area(f, L2 + L1, L1);
    check_next_dirty_area(f, L2, 0);
    check_next_dirty_area(f, L2 + 1, 0);

    fixture_set(f, L2 * 2, L3 - L2 * 2);
    check_next_dirty_area(f, 0, UINT64_MAX);
    check_next_dirty_area(f, L2, UINT64_MAX);
    check_next_dirty_area(f, L2 + 1, UINT64_MAX);
    check_next_dirty_area(f, L2 + 5 + L1 - 1, UINT64_MAX);
    check_next_dirty_area(f, L2 + 5 + L1, 5);
    check_next_dirty_area(f, L2 * 2 - L1, L1 + 1);
    check_next_dirty_area(f, L2 * 2, L2);

    fixture_set(f, 0, L3);
    check_next_dirty_area(f, 0, UINT64_MAX);
}

static void expect_no_dirty_area(const HBitmap *hb, uint64_t start, uint64_t count)
{
    uint64_t s = start, c = count;

    g_assert_false(hbitmap_next_dirty_area(hb, &s, &c));
    g_assert_cmpuint(s, ==, start);             /* untouched */
    g_assert_cmpuint(c, ==, count);
}

static void test_next_dirty_area_explicit(void)
{
    HBitmap *hb = hbitmap_alloc(100, 0), *g3 = hbitmap_alloc(100, 3);

    hbitmap_set(hb, 10, 20);
    hbitmap_set(hb, 50, 5);
    expect_dirty_area_at(hb, 0, 100, 10, 20);
    expect_dirty_area_at(hb, 15, 100, 15, 15);
    expect_dirty_area_at(hb, 30, 70, 50, 5);
    expect_dirty_area_at(hb, 0, 12, 10, 2);
    expect_dirty_area_at(hb, 52, UINT64_MAX, 52, 3);
    expect_no_dirty_area(hb, 55, 45);
    expect_no_dirty_area(hb, 0, 10);
    expect_no_dirty_area(hb, 10, 0);
    expect_no_dirty_area(hb, 100, 1);

    hbitmap_set(g3, 10, 20);                    /* groups 1..3: items 8..31 */
    expect_dirty_area_at(g3, 0, 100, 8, 24);
    expect_dirty_area_at(g3, 12, 4, 12, 4);
    expect_dirty_area_at(g3, 30, 10, 30, 2);
    expect_no_dirty_area(g3, 32, 68);
    hbitmap_set(g3, 99, 1);                     /* last group: items 96..103, size 100 */
    expect_dirty_area_at(g3, 40, UINT64_MAX, 96, 4);
    hbitmap_free(hb);
    hbitmap_free(g3);
}

/* ---- broken preconditions abort, naming the function and the values ----------------------- */

typedef struct {
    const char *name;
    void (*violate)(void);
    const char *pattern;        /* glob that this library's message on stderr must match */
    bool ours_only;             /* the original reads out of bounds instead: not run on it */
} AbortCase;

static void violate_set_past_end(void)
{
    hbitmap_set(hbitmap_alloc(1000, 0), 990, 37);
}

static void violate_reset_past_end(void)
{
    hbitmap_reset(hbitmap_alloc(1000, 2), 1004, 1);
}

static void violate_get_past_end(void)
{
    hbitmap_get(hbitmap_alloc(1000, 0), 1234);
}

static void violate_alloc_granularity(void)
{
    hbitmap_alloc(1000, 64);
}

static void violate_alloc_negative_granularity(void)
{
    hbitmap_alloc(1000, -1);
}

static void violate_alloc_too_large(void)
{
    hbitmap_alloc(UINT64_C(1) << 42, 0);
}

static void violate_truncate_too_large(void)
{
    hbitmap_truncate(hbitmap_alloc(1000, 0), UINT64_C(1) << 42);
}

static void violate_serialize_misaligned(void)
{
    uint8_t buf[64];

    hbitmap_serialize_part(hbitmap_alloc(L2, 0), buf, 65, 128);
}

static void violate_serialize_count(void)
{
    uint8_t buf[64];

    hbitmap_serialize_part(hbitmap_alloc(L2, 0), buf, 0, 100);
}

static void violate_deserialize_misaligned(void)
{
    uint8_t buf[64] = { 0 };

    hbitmap_deserialize_part(hbitmap_alloc(L2, 0), buf, 96, 64, true);
}

static void violate_serialization_align(void)
{
    hbitmap_serialization_align(hbitmap_alloc(1000, 58));
}

static void violate_free_with_meta(void)
{
    HBitmap *hb = hbitmap_alloc(1000, 0);

    hbitmap_create_meta(hb, 8);
    hbitmap_free(hb);
}

static void violate_free_meta_pointer(void)
{
    HBitmap *hb = hbitmap_alloc(1000, 0);
    HBitmap *meta = hbitmap_create_meta(hb, 8);

    /* QEMU's pattern: the parent changes, the meta bitmap is read and reset through its own
     * pointer; only then the broken call. */
    hbitmap_set(hb, 100, 1);
    hbitmap_reset(meta, 0, 1000);
    hbitmap_set(hb, 900, 1);
    g_assert_true(hbitmap_get(meta, 900));
    hbitmap_free(meta);
}

static void violate_create_meta_twice(void)
{
    HBitmap *hb = hbitmap_alloc(1000, 0);

    hbitmap_create_meta(hb, 8);
    hbitmap_create_meta(hb, 8);
}

static void violate_create_meta_chunk(void)
{
    hbitmap_create_meta(hbitmap_alloc(1000, 0), 24);
}

static void violate_free_meta_none(void)
{
    hbitmap_free_meta(hbitmap_alloc(1000, 0));
}

static void violate_iter_init_past_end(void)
{
    HBitmapIter hbi;

    hbitmap_iter_init(&hbi, hbitmap_alloc(1000, 0), 1000);
}

static void violate_iter_next_after_shrink(void)
{
    HBitmapIter hbi;
    HBitmap *hb = hbitmap_alloc(1 << 20, 0);

    hbitmap_set(hb, (1 << 20) - 10, 1);
    hbitmap_iter_init(&hbi, hb, (1 << 20) - 64);
    hbitmap_iter_next(&hbi, true);
    hbitmap_truncate(hb, 64);
    hbitmap_iter_next(&hbi, true);
}

static void violate_iter_next_null(void)
{
    hbitmap_iter_next(NULL, true);
}

static void violate_iter_init_size_zero(void)
{
    HBitmapIter hbi;

    hbitmap_iter_init(&hbi, hbitmap_alloc(0, 0), 0);
}

static const AbortCase abort_cases[] = {
    { "set-past-end", violate_set_past_end, "*hbitmap_set*990*37*" },
    { "reset-past-end", violate_reset_past_end, "*hbitmap_reset*1004*" },
    { "get-past-end", violate_get_past_end, "*hbitmap_get*1234*" },
    { "alloc-granularity-64", violate_alloc_granularity, "*hbitmap_alloc*granularity 64*" },
    { "alloc-granularity-negative", violate_alloc_negative_granularity,
      "*hbitmap_alloc*granularity -1*" },
    { "alloc-too-large", violate_alloc_too_large, "*hbitmap_alloc*4398046511104*" },
    { "truncate-too-large", violate_truncate_too_large, "*hbitmap_truncate*4398046511104*" },
    { "serialize-misaligned-start", violate_serialize_misaligned,
      "*hbitmap_serialize_part*65*64*" },
    { "serialize-misaligned-count", violate_serialize_count, "*hbitmap_serialize_part*100*64*" },
    { "deserialize-misaligned-start", violate_deserialize_misaligned,
      "*hbitmap_deserialize_part*96*64*" },
    { "serialization-align-granularity-58", violate_serialization_align,
      "*hbitmap_serialization_align*58*" },
    { "free-with-meta", violate_free_with_meta, "*hbitmap_free*meta*" },
    { "free-meta-pointer", violate_free_meta_pointer, "*hbitmap_free*is a meta bitmap*",
      .ours_only = true },
    { "create-meta-twice", violate_create_meta_twice, "*hbitmap_create_meta*meta*" },
    { "create-meta-chunk-24", violate_create_meta_chunk, "*hbitmap_create_meta*24*" },
    { "free-meta-none", violate_free_meta_none, "*hbitmap_free_meta*" },
    { "iter-init-past-end", violate_iter_init_past_end, "*hbitmap_iter_init*1000*" },
    { "iter-init-size-zero", violate_iter_init_size_zero, "*hbitmap_iter_init*0*" },
    { "iter-next-after-shrink", violate_iter_next_after_shrink,
      "*hbitmap_iter_next*word 16383*1 words*", .ours_only = true },
    { "iter-next-null", violate_iter_next_null, "*hbitmap_iter_next*hbi is NULL*",
      .ours_only = true },
};

#define ABORT_MARKER "[test-hbitmap: caught SIGABRT]"

static void on_abort(int sig)
{
    static const char marker[] = "\n" ABORT_MARKER "\n";
    ssize_t written = write(STDERR_FILENO, marker, sizeof(marker) - 1);

    (void)written;
    signal(sig, SIG_DFL);
    raise(sig);
}

static void test_abort(gconstpointer data)
{
    const AbortCase *c = data;

    if (no_subprocess) {
        g_test_skip("HBITMAP_TEST_NO_SUBPROCESS is set (valgrind)");
        return;
    }
    if (c->ours_only && testing_original) {
        g_test_skip("the original has no check for this");
        return;
    }
    if (g_test_subprocess()) {
        struct rlimit no_core = { 0, 0 };

        setrlimit(RLIMIT_CORE, &no_core);
        signal(SIGABRT, on_abort);
        c->violate();
        exit(0);        /* no abort: the parent's g_test_trap_assert_failed fails */
    }
    g_test_trap_subprocess(NULL, 0, G_TEST_SUBPROCESS_DEFAULT);
    g_test_trap_assert_failed();
    /* Aborted, not crashed: only SIGABRT runs on_abort. */
    g_test_trap_assert_stderr("*" ABORT_MARKER "*");
    if (!testing_original) {
        g_test_trap_assert_stderr(c->pattern);
    }
}

/* ---- main -------------------------------------------------------------------------------- */

#define ADD(path, fn) g_test_add(path, Fixture, NULL, NULL, fn, fixture_teardown)
#define ADD_DATA(path, data, fn) \
    g_test_add(path, Fixture, GINT_TO_POINTER(data), NULL, fn, fixture_teardown)

static const TruncateCase truncate_cases[] = {
    { L2, 0, 0 },                       /* nop */
    { L2, 1, 0 },                       /* grow/negligible */
    { L2, -1, 0 },                      /* shrink/negligible */
    { L2, (int64_t)L1, 0 },             /* grow/tiny */
    { L2, -(int64_t)L1, 0 },            /* shrink/tiny */
    { L2, (int64_t)L2, 0 },             /* grow/small */
    { L2, -(int64_t)(L2 - L1 - 1), 0 }, /* shrink/small */
    { L2, (int64_t)(L3 - L2), 0 },      /* grow/medium */
    { L3, -(int64_t)(L3 - L2 - 7), 0 }, /* shrink/medium */
    { L2, (int64_t)(L3 * 2), 0 },       /* grow/large */
    { L3 * 2, -(int64_t)(L3 * 2 - 5), 0 }, /* shrink/large */
    { L2, -(int64_t)L2, 0 },            /* shrink/to-zero */
    { 1000, 1000, 3 },                  /* grow/granularity */
    { 1000, -333, 3 },                  /* shrink/granularity: partial last group */
    { 1000, -3, 3 },                    /* shrink/within-group: the same groups */
};
static const char *const truncate_names[] = {
    "nop", "grow/negligible", "shrink/negligible", "grow/tiny", "shrink/tiny", "grow/small",
    "shrink/small", "grow/medium", "shrink/medium", "grow/large", "shrink/large",
    "shrink/to-zero", "grow/granularity", "shrink/granularity", "shrink/within-group",
};
G_STATIC_ASSERT(G_N_ELEMENTS(truncate_cases) == G_N_ELEMENTS(truncate_names));

int main(int argc, char **argv)
{
    g_test_init(&argc, &argv, NULL);
    testing_original = g_strcmp0(g_getenv("HBITMAP_TEST_IMPL"), "original") == 0;
    no_subprocess = g_getenv("HBITMAP_TEST_NO_SUBPROCESS") != NULL;
    if (!g_test_subprocess()) {
        g_test_message("libhbitmap C tests, %s library%s", HBITMAP_TEST_LINKAGE,
                       testing_original ? ", running on the original C" : "");
    }

    g_test_add_func("/hbitmap/layout", test_layout);
    ADD("/hbitmap/size/0", test_size_zero);
    ADD("/hbitmap/size/unaligned", test_size_unaligned);
    g_test_add_func("/hbitmap/alloc/granularities", test_granularities);
    g_test_add_func("/hbitmap/free/null", test_free_null);
    ADD("/hbitmap/granularity/struct-example", test_granularity_struct_example);
    ADD("/hbitmap/granularity/qemu", test_granularity_qemu);
    ADD("/hbitmap/granularity/partial", test_granularity_partial);

    ADD("/hbitmap/iter/empty", test_iter_empty);
    ADD("/hbitmap/iter/partial", test_iter_partial);
    ADD("/hbitmap/iter/granularity", test_iter_granularity);
    ADD("/hbitmap/iter/no-advance", test_iter_no_advance);
    ADD("/hbitmap/iter/reset-ahead", test_iter_reset_ahead);
    ADD("/hbitmap/iter/reset-all", test_iter_reset_all);
    ADD("/hbitmap/iter/next-word", test_iter_next_word);
    ADD("/hbitmap/iter/next-word-mixed", test_iter_next_word_mixed);
    ADD("/hbitmap/iter/skip-words", test_iter_skip_words);

    ADD("/hbitmap/get/all", test_get_all);
    ADD("/hbitmap/get/some", test_get_some);
    ADD("/hbitmap/set/all", test_set_all);
    ADD("/hbitmap/set/one", test_set_one);
    ADD("/hbitmap/set/two-elem", test_set_two_elem);
    ADD("/hbitmap/set/general", test_set_general);
    ADD("/hbitmap/set/twice", test_set_twice);
    ADD("/hbitmap/set/overlap", test_set_overlap);
    ADD("/hbitmap/set/zero-count", test_set_zero_count);
    ADD("/hbitmap/reset/empty", test_reset_empty);
    ADD("/hbitmap/reset/general", test_reset_general);
    ADD("/hbitmap/reset/all", test_reset_all);
    ADD_DATA("/hbitmap/random/granularity-0", 0, test_random);
    ADD_DATA("/hbitmap/random/granularity-2", 2, test_random);

    for (size_t i = 0; i < G_N_ELEMENTS(truncate_cases); i++) {
        g_autofree char *path = g_strdup_printf("/hbitmap/truncate/%s", truncate_names[i]);

        g_test_add(path, Fixture, &truncate_cases[i], NULL, test_truncate, fixture_teardown);
    }
    ADD("/hbitmap/truncate/moves-end", test_truncate_moves_end);

    g_test_add_func("/hbitmap/merge/basic", test_merge_basic);
    g_test_add_func("/hbitmap/merge/empty", test_merge_empty);
    g_test_add_func("/hbitmap/merge/mismatch", test_merge_mismatch);

    ADD("/hbitmap/meta/zero", test_meta_zero);
    ADD_DATA("/hbitmap/meta/one", 1, test_meta_chunk);
    ADD_DATA("/hbitmap/meta/byte", 8, test_meta_chunk);
    ADD_DATA("/hbitmap/meta/word", 64, test_meta_chunk);
    ADD_DATA("/hbitmap/meta/sector", 512 * 8, test_meta_chunk);
    ADD("/hbitmap/meta/word-rule", test_meta_word_rule);
    ADD("/hbitmap/meta/granularity", test_meta_granularity);
    ADD("/hbitmap/meta/truncate", test_meta_truncate);

    g_test_add_func("/hbitmap/serialize/align", test_serialize_align);
    g_test_add_func("/hbitmap/serialize/size", test_serialize_size);
    ADD("/hbitmap/serialize/basic", test_serialize_basic);
    ADD("/hbitmap/serialize/part", test_serialize_part);
    ADD("/hbitmap/serialize/zeroes", test_serialize_zeroes);
    ADD("/hbitmap/serialize/ones", test_serialize_ones);
    g_test_add_func("/hbitmap/serialize/little-endian", test_serialize_little_endian);
    g_test_add_func("/hbitmap/sha256/known", test_sha256_known);
    g_test_add_func("/hbitmap/sha256/serialization", test_sha256_serialization);

    ADD_DATA("/hbitmap/next_zero/granularity-0", 0, test_next_zero);
    ADD_DATA("/hbitmap/next_zero/granularity-1", 1, test_next_zero);
    ADD_DATA("/hbitmap/next_zero/granularity-4", 4, test_next_zero);
    ADD("/hbitmap/next_zero/explicit", test_next_zero_explicit);
    ADD_DATA("/hbitmap/next_dirty_area/granularity-0", 0, test_next_dirty_area);
    ADD_DATA("/hbitmap/next_dirty_area/granularity-1", 1, test_next_dirty_area);
    ADD_DATA("/hbitmap/next_dirty_area/granularity-4", 4, test_next_dirty_area);
    g_test_add_func("/hbitmap/next_dirty_area/explicit", test_next_dirty_area_explicit);

    for (size_t i = 0; i < G_N_ELEMENTS(abort_cases); i++) {
        g_autofree char *path = g_strdup_printf("/hbitmap/abort/%s", abort_cases[i].name);

        g_test_add_data_func(path, &abort_cases[i], test_abort);
    }
    return g_test_run();
}
