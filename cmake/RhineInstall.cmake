# `cmake --install` lays out headers, libraries and a CMake package so that
# downstream projects write
#     find_package(Rhine REQUIRED)
#     target_link_libraries(app PRIVATE rhine::rhine)      # or rhine::tokenizer
include(CMakePackageConfigHelpers)
set(RHINE_CMAKE_DIR ${CMAKE_INSTALL_LIBDIR}/cmake/Rhine)

get_property(RHINE_EXPORTED_TARGETS GLOBAL PROPERTY RHINE_EXPORTED_TARGETS)
install(TARGETS ${RHINE_EXPORTED_TARGETS}
  EXPORT RhineTargets
  ARCHIVE DESTINATION ${CMAKE_INSTALL_LIBDIR}
  LIBRARY DESTINATION ${CMAKE_INSTALL_LIBDIR}
  RUNTIME DESTINATION ${CMAKE_INSTALL_BINDIR})
install(DIRECTORY ${PROJECT_SOURCE_DIR}/include/rhine DESTINATION ${CMAKE_INSTALL_INCLUDEDIR})
install(FILES ${PROJECT_BINARY_DIR}/include/rhine/version.h
        DESTINATION ${CMAKE_INSTALL_INCLUDEDIR}/rhine)
install(EXPORT RhineTargets NAMESPACE rhine:: DESTINATION ${RHINE_CMAKE_DIR})

configure_package_config_file(${PROJECT_SOURCE_DIR}/cmake/RhineConfig.cmake.in
  ${PROJECT_BINARY_DIR}/RhineConfig.cmake
  INSTALL_DESTINATION ${RHINE_CMAKE_DIR})
write_basic_package_version_file(${PROJECT_BINARY_DIR}/RhineConfigVersion.cmake
  VERSION ${PROJECT_VERSION} COMPATIBILITY SameMinorVersion)
install(FILES ${PROJECT_BINARY_DIR}/RhineConfig.cmake ${PROJECT_BINARY_DIR}/RhineConfigVersion.cmake
              ${PROJECT_SOURCE_DIR}/cmake/RhineTorchWheel.cmake
        DESTINATION ${RHINE_CMAKE_DIR})
