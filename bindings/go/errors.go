// SPDX-License-Identifier: GPL-2.0-or-later

package hbitmap

/*
#include <stdlib.h>
*/
import "C"

import (
	"fmt"
	"strings"
	"syscall"
	"unicode/utf8"
	"unsafe"
)

// Error is the error of every operation of the package.
type Error struct {
	// Op is the operation, named as the method ("open", "add", "merge"...).
	Op string
	// Path is the image's path ("" for an in-memory bitmap).
	Path string
	// Bitmap is the bitmap's name, when the operation has one.
	Bitmap string
	// Errno says what kind of error it is; see the package documentation.
	Errno syscall.Errno
	// Msg is the library's message, or the package's for a refused argument.
	Msg string
}

// Error returns "hbitmap: OP PATH: bitmap 'NAME': MESSAGE".
func (e *Error) Error() string {
	var b strings.Builder
	b.WriteString("hbitmap: ")
	b.WriteString(e.Op)
	if e.Path != "" {
		b.WriteString(" ")
		b.WriteString(e.Path)
	}
	if e.Bitmap != "" && !strings.Contains(e.Msg, "'"+quoteName(e.Bitmap)+"'") {
		fmt.Fprintf(&b, ": bitmap '%s'", quoteName(e.Bitmap))
	}
	b.WriteString(": ")
	if e.Msg != "" {
		b.WriteString(e.Msg)
	} else {
		b.WriteString(e.Errno.Error())
	}
	return b.String()
}

// Unwrap returns the errno, so that errors.Is matches it and the io/fs errors it stands for.
func (e *Error) Unwrap() error { return e.Errno }

// Is reports whether target is the errno of e (errors.Is also follows Unwrap to match
// fs.ErrNotExist and the like).
func (e *Error) Is(target error) bool {
	errno, ok := target.(syscall.Errno)
	return ok && errno == e.Errno
}

// quoteName shows a name as the library's messages do: control characters and bytes that are
// not UTF-8 escaped.
func quoteName(name string) string {
	var b strings.Builder
	for i := 0; i < len(name); {
		c := name[i]
		r, size := utf8.DecodeRuneInString(name[i:])
		bad := r == utf8.RuneError && size == 1
		switch {
		case r == '\\':
			b.WriteString(`\\`)
		case r == '\t':
			b.WriteString(`\t`)
		case r == '\n':
			b.WriteString(`\n`)
		case r == '\r':
			b.WriteString(`\r`)
		case r == 0:
			b.WriteString(`\0`)
		case bad || r < 0x20 || r == 0x7f:
			fmt.Fprintf(&b, `\x%02x`, c)
		default:
			b.WriteString(name[i : i+size])
		}
		i += size
	}
	return b.String()
}

// fail makes the error of a C call that returned ret (a negative errno) and message msg,
// freeing msg.
func fail(op, path, bitmap string, ret C.int, msg *C.char) error {
	text := ""
	if msg != nil {
		text = C.GoString(msg)
		C.free(unsafe.Pointer(msg))
	}
	return &Error{Op: op, Path: path, Bitmap: bitmap, Errno: syscall.Errno(-ret), Msg: text}
}

// refuse makes the error of an argument refused before any C call.
func refuse(op, path, bitmap string, errno syscall.Errno, format string, args ...interface{}) error {
	return &Error{Op: op, Path: path, Bitmap: bitmap, Errno: errno, Msg: fmt.Sprintf(format, args...)}
}
