/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * Compiled (never run) by the meson 'header' suite, as C11 and as C++, with -Wall -Wextra
 * -Werror and more: include/hbitmap.h must compile warning-free wherever QEMU includes it, and
 * declare exactly QEMU's prototypes and HBitmapIter layout.
 *
 *   -DHBITMAP_TEST_QEMU_TYPEDEFS   QEMU's include/qemu/typedefs.h typedefs come first
 *   -DHBITMAP_TEST_INCLUDE_TWICE   the header is included twice
 */
#ifdef HBITMAP_TEST_QEMU_TYPEDEFS
typedef struct HBitmap HBitmap;
typedef struct HBitmapIter HBitmapIter;
typedef struct Error Error;
#endif

#include "hbitmap.h"
#ifdef HBITMAP_TEST_INCLUDE_TWICE
#include "hbitmap.h"
#endif

#ifdef __cplusplus
#define HBITMAP_CHECK(cond) static_assert(cond, #cond)
#else
#define HBITMAP_CHECK(cond) _Static_assert(cond, #cond)
#endif

/* QEMU's header facts for LP64 hosts. */
HBITMAP_CHECK(BITS_PER_LONG == 64);
HBITMAP_CHECK(BITS_PER_LEVEL == 6);
HBITMAP_CHECK(HBITMAP_LOG_MAX_SIZE == 41);
HBITMAP_CHECK(HBITMAP_LEVELS == 7);
HBITMAP_CHECK(sizeof(HBitmapIter) == 80);
HBITMAP_CHECK(offsetof(HBitmapIter, hb) == 0);
HBITMAP_CHECK(offsetof(HBitmapIter, granularity) == 8);
HBITMAP_CHECK(offsetof(HBitmapIter, pos) == 16);
HBITMAP_CHECK(offsetof(HBitmapIter, cur) == 24);
HBITMAP_CHECK(sizeof(((HBitmapIter *)0)->cur) == HBITMAP_LEVELS * sizeof(unsigned long));

/*
 * Every function, assigned to a pointer typed with the prototype from QEMU's
 * include/qemu/hbitmap.h: any difference in a parameter or return type is a compile error.
 */
struct hbitmap_api {
    HBitmap *(*alloc)(uint64_t size, int granularity);
    void (*truncate)(HBitmap *hb, uint64_t size);
    bool (*merge)(const HBitmap *a, const HBitmap *b, HBitmap *result);
    bool (*can_merge)(const HBitmap *a, const HBitmap *b);
    bool (*empty)(const HBitmap *hb);
    int (*granularity)(const HBitmap *hb);
    uint64_t (*count)(const HBitmap *hb);
    void (*set)(HBitmap *hb, uint64_t start, uint64_t count);
    void (*reset)(HBitmap *hb, uint64_t start, uint64_t count);
    void (*reset_all)(HBitmap *hb);
    bool (*get)(const HBitmap *hb, uint64_t item);
    bool (*is_serializable)(const HBitmap *hb);
    uint64_t (*serialization_align)(const HBitmap *hb);
    uint64_t (*serialization_size)(const HBitmap *hb, uint64_t start, uint64_t count);
    void (*serialize_part)(const HBitmap *hb, uint8_t *buf, uint64_t start, uint64_t count);
    void (*deserialize_part)(HBitmap *hb, uint8_t *buf, uint64_t start, uint64_t count,
                             bool finish);
    void (*deserialize_zeroes)(HBitmap *hb, uint64_t start, uint64_t count, bool finish);
    void (*deserialize_ones)(HBitmap *hb, uint64_t start, uint64_t count, bool finish);
    void (*deserialize_finish)(HBitmap *hb);
    char *(*sha256)(const HBitmap *bitmap, Error **errp);
    void (*free)(HBitmap *hb);
    void (*iter_init)(HBitmapIter *hbi, const HBitmap *hb, uint64_t first);
    unsigned long (*iter_skip_words)(HBitmapIter *hbi);
    int64_t (*next_zero)(const HBitmap *hb, uint64_t start, uint64_t count);
    bool (*next_dirty_area)(const HBitmap *hb, uint64_t *start, uint64_t *count);
    HBitmap *(*create_meta)(HBitmap *hb, int chunk_size);
    void (*free_meta)(HBitmap *hb);
    int64_t (*iter_next)(HBitmapIter *hbi, bool advance);
    size_t (*iter_next_word)(HBitmapIter *hbi, unsigned long *p_cur);
};

extern const struct hbitmap_api hbitmap_api_check;
const struct hbitmap_api hbitmap_api_check = {
    hbitmap_alloc,
    hbitmap_truncate,
    hbitmap_merge,
    hbitmap_can_merge,
    hbitmap_empty,
    hbitmap_granularity,
    hbitmap_count,
    hbitmap_set,
    hbitmap_reset,
    hbitmap_reset_all,
    hbitmap_get,
    hbitmap_is_serializable,
    hbitmap_serialization_align,
    hbitmap_serialization_size,
    hbitmap_serialize_part,
    hbitmap_deserialize_part,
    hbitmap_deserialize_zeroes,
    hbitmap_deserialize_ones,
    hbitmap_deserialize_finish,
    hbitmap_sha256,
    hbitmap_free,
    hbitmap_iter_init,
    hbitmap_iter_skip_words,
    hbitmap_next_zero,
    hbitmap_next_dirty_area,
    hbitmap_create_meta,
    hbitmap_free_meta,
    hbitmap_iter_next,
    hbitmap_iter_next_word,
};
