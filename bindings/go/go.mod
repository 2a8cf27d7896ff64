module libhbitmap.org/go/hbitmap

go 1.19
