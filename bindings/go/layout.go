// SPDX-License-Identifier: GPL-2.0-or-later

package hbitmap

/*
#include <hbitmap.h>
*/
import "C"

import "unsafe"

// Extent is passed to the C ABI as an array of HBitmapQcow2Extent: the two must have one
// layout. Each constant below overflows (a compile error) if they differ.
const (
	_ = -(unsafe.Sizeof(Extent{}) ^ unsafe.Sizeof(C.HBitmapQcow2Extent{}))
	_ = -(unsafe.Offsetof(Extent{}.Offset) ^ unsafe.Offsetof(C.HBitmapQcow2Extent{}.offset))
	_ = -(unsafe.Offsetof(Extent{}.Length) ^ unsafe.Offsetof(C.HBitmapQcow2Extent{}.length))
)
